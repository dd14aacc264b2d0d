"""Train and evaluate a model: ``python run_recbole_llm.py --model=GLTA --dataset=ml-100k [--key=value ...]``."""
import sys

from recbole_llm.quick_start import main

if __name__ == "__main__":
    sys.exit(main())
