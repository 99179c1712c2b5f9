"""Data: formats (OpenAI chat, prompt/completion, text), check, render + mask, pack."""
