from recbole.trainer import Trainer


class LLMTrainer(Trainer):
    pass
