"""tunekit: check, see, train and evaluate fine-tunes of open LLMs on OpenAI-format chat data.

Python API (the CLI is a thin layer over these):

    from tunekit.config import load_config
    import tunekit
    result = tunekit.train(load_config("run.yaml", ["train.lr=1e-4"]))   # -> TrainResult(run_dir, summary)

`tunekit.train` is the function (the package of the training stage is `tunekit.train`'s files: import its
names with `from tunekit.train.loop import ...`). The stages, in the order data flows: data/, model.py,
train/, eval/, export/, generate/, serve/ (docs/architecture.md).
"""

from tunekit.config import RunConfig, load_config
from tunekit.train.loop import TrainResult, train

__version__ = "0.1.0"
__all__ = ["RunConfig", "TrainResult", "load_config", "train", "__version__"]
