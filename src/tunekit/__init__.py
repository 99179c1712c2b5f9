"""tunekit: check, see, train and evaluate fine-tunes of open LLMs on OpenAI-format chat data."""

__version__ = "0.1.0"
