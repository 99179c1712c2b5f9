"""`tunekit serve`: an OpenAI-compatible server for base models, runs and their adapters.

app.py builds the FastAPI app (`create_app`), chat.py holds the chat-completions and models routes,
inference.py the loaded models and the batching generation loop.
"""
