"""A small client of the control plane's REST API, for the ``nstudent generations`` and ``datasets`` commands.

Contract: every method returns the API's JSON (a dict) or raises ``ApiError`` whose message is one line fit
to show a user: the HTTP status and the API's ``detail`` (for a 422, each invalid field's location and
message), or why the server could not be reached. No other exception leaves this module for an HTTP
failure. The server URL and the token come from the caller; ``from_env`` reads ``NSTUDENT_URL`` and
``NSTUDENT_TOKEN``, falling back to the development token that ``nstudent serve`` writes in its data dir.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import httpx

DEFAULT_URL = "http://127.0.0.1:8000"


class ApiError(Exception):
    """One line for the user; ``status`` is the HTTP status, or None when no answer came."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


def default_token() -> str | None:
    """``NSTUDENT_TOKEN``, else the token a development server keeps in ``<NSTUDENT_DATA_DIR>/api-token``."""
    if token := os.environ.get("NSTUDENT_TOKEN"):
        return token
    path = Path(os.environ.get("NSTUDENT_DATA_DIR") or "nstudent-data") / "api-token"
    try:
        return path.read_text().strip() or None
    except OSError:
        return None


def _detail(response: httpx.Response) -> str:
    """The API's ``detail`` in one line: a message, or ``loc: msg`` for each invalid field."""
    try:
        detail = response.json().get("detail")
    except ValueError:
        detail = None
    if isinstance(detail, list):
        parts = []
        for item in detail:
            if isinstance(item, dict):
                loc = ".".join(str(p) for p in item.get("loc", []) if p not in ("body", "query", "path"))
                parts.append(f"{loc}: {item.get('msg', '')}" if loc else str(item.get("msg", item)))
            else:
                parts.append(str(item))
        detail = "; ".join(parts)
    text = str(detail) if detail else (response.text.strip() or response.reason_phrase)
    return " ".join(text.split())[:500]


class Client:
    def __init__(
        self,
        url: str = DEFAULT_URL,
        token: str | None = None,
        timeout: float = 30.0,
        transport: httpx.BaseTransport | None = None,
    ):
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.url = url.rstrip("/")
        self.http = httpx.Client(base_url=self.url, headers=headers, timeout=timeout, transport=transport)

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def request(self, method: str, path: str, **kw: Any) -> Any:
        try:
            response = self.http.request(method, path, **kw)
        except httpx.TimeoutException:
            raise ApiError(f"{self.url} did not answer {method} {path} in time") from None
        except httpx.HTTPError as e:
            raise ApiError(f"cannot reach the nstudent server at {self.url}: {e}") from None
        if response.status_code >= 400:
            hint = ""
            if response.status_code == 401:
                hint = " (give a token: --token or NSTUDENT_TOKEN)"
            raise ApiError(f"{method} {path}: {response.status_code} {_detail(response)}{hint}", response.status_code)
        try:
            return response.json()
        except ValueError:
            raise ApiError(
                f"{method} {path}: the answer is not JSON (is {self.url} an nstudent server?)", response.status_code
            ) from None

    # generations

    def create(self, body: dict[str, Any], idempotency_key: str | None = None) -> dict[str, Any]:
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        return self.request("POST", "/generations", json=body, headers=headers)

    def generations(self, offset: int = 0, limit: int = 50, stage: str | None = None) -> dict[str, Any]:
        params: dict[str, Any] = {"offset": offset, "limit": limit}
        if stage:
            params["stage"] = stage
        return self.request("GET", "/generations", params=params)

    def generation(self, generation_id: str) -> dict[str, Any]:
        return self.request("GET", f"/generations/{generation_id}")

    def cancel(self, generation_id: str) -> dict[str, Any]:
        return self.request("POST", f"/generations/{generation_id}/cancel")

    def retry(self, generation_id: str) -> dict[str, Any]:
        return self.request("POST", f"/generations/{generation_id}/retry")

    def model(self, generation_id: str) -> dict[str, Any]:
        return self.request("GET", f"/generations/{generation_id}/model")

    # datasets

    def dataset(self, dataset_id: str) -> dict[str, Any]:
        return self.request("GET", f"/datasets/{dataset_id}")

    def manifest(self, dataset_id: str, offset: int = 0, limit: int = 100) -> dict[str, Any]:
        return self.request("GET", f"/datasets/{dataset_id}/manifest", params={"offset": offset, "limit": limit})
