"""Errors in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}` with the HTTP status."""

from __future__ import annotations

_TYPE_NAMES = {"str", "int", "float", "bool", "dict", "list", "none", "literal"}


class APIError(Exception):
    """A request the server answers with an error; `param` names the request field at fault."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error", hint: str | None = None):
        self.status, self.param, self.code, self.type = status, param, code, type
        self.message = f"{message}. Fix: {hint}" if hint else message
        super().__init__(self.message)

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    @classmethod
    def from_validation(cls, errors: list[dict]) -> APIError:
        """A 400 naming the first invalid field (pydantic's `loc` as `messages[0].role`), listing all."""
        parts = []
        for err in errors:
            where = ""
            for item in err.get("loc", ()):
                if item == "body" or (isinstance(item, str) and (item in _TYPE_NAMES or any(c in item for c in "[(-"))):
                    continue  # pydantic names the union member it tried ("str", "list[str]"): not a field
                where += f"[{item}]" if isinstance(item, int) else (f".{item}" if where else str(item))
            if where not in {w for w, _ in parts}:
                parts.append((where, err.get("msg", "invalid")))
        message = "; ".join(f"{w}: {m}" if w else m for w, m in parts)
        return cls(400, message or "invalid request body", param=parts[0][0] if parts else None)
