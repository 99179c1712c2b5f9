"""Training: `loop.py` (setup, then the loop top to bottom), the objective of a step (`sft.py`), checkpoints,
several processes (`distributed.py`), the pre-flight memory estimate, experiment trackers and the automatic
hyperparameters (`hyper.py`, shared with the fine-tuning API's worker).

Nothing is imported here, so that reading `hyper` (as the server's worker does) never loads the loop.
"""
