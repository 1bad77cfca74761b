"""Trainers as tasks of the shared engine (``avatarcli.train.task.TrainTask``)."""
