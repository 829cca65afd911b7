"""Read training records from JSONL or plain text, refusing malformed input by line number.

Accepted JSONL lines (one JSON object per line; blank lines are allowed and skipped):
  {"text": "..."}                                          every token is trained
  {"prompt": "...", "completion": "..."}                   only the completion is trained
  {"messages": [{"role": "user", "content": "..."}, ...]}  chat: only assistant turns trained
Plain text (any other suffix): paragraphs separated by blank lines, each one document.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from jaxturbo.errors import UserError

Record = dict[str, Any]
ROLES = ("system", "user", "assistant", "tool")


def _check_record(obj: Any, where: str) -> Record:
    if not isinstance(obj, dict):
        raise UserError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    if "messages" in obj:
        msgs = obj["messages"]
        if not isinstance(msgs, list) or not msgs:
            raise UserError(f'{where}: "messages" must be a non-empty list')
        for j, m in enumerate(msgs):
            if not isinstance(m, dict) or not isinstance(m.get("content"), str):
                raise UserError(f'{where}: messages[{j}] needs a string "content"')
            if m.get("role") not in ROLES:
                raise UserError(
                    f"{where}: messages[{j}] has role {m.get('role')!r}; roles: {', '.join(ROLES)}"
                )
        if not any(m["role"] == "assistant" for m in msgs):
            raise UserError(f"{where}: conversation has no assistant turn, so nothing to train on")
        return {"messages": msgs}
    if "prompt" in obj or "completion" in obj:
        if not (isinstance(obj.get("prompt"), str) and isinstance(obj.get("completion"), str)):
            raise UserError(f'{where}: "prompt" and "completion" must both be strings')
        return {"prompt": obj["prompt"], "completion": obj["completion"]}
    if isinstance(obj.get("text"), str):
        return {"text": obj["text"]}
    raise UserError(
        f'{where}: a record needs "text", "prompt"+"completion" or "messages" '
        f"(keys found: {', '.join(sorted(obj)) or 'none'})"
    )


def read_records(path: str | Path) -> list[Record]:
    """All records of a .jsonl / .json-lines file or a text file (see module docstring)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"data file {path} does not exist")
    text = path.read_text(encoding="utf-8")
    records: list[Record] = []
    if path.suffix in (".jsonl", ".json"):
        for lineno, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
            records.append(_check_record(obj, where))
    else:
        para: list[str] = []
        for line in text.splitlines() + [""]:
            if line.strip():
                para.append(line.strip())
            elif para:
                records.append({"text": "\n".join(para)})
                para = []
    if not records:
        raise UserError(f"data file {path} holds no records")
    return records
