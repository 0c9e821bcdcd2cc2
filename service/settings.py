"""Every knob of the control plane in one validated object, read from the environment (prefix NSTUDENT_).

A few settings also answer to the names their ecosystems use (DATABASE_URL, RAY_ADDRESS, RAY_AUTH_TOKEN).
S3 endpoint and credentials are not settings here: every process that touches storage (the server and the
Ray workers alike) reads the standard AWS variables, listed in ``STORAGE_ENV``.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Annotated, Literal

from pydantic import AliasChoices, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from curation import access

# Read by curation/storage.py in every process that reaches s3:// (the API server and the Ray nodes).
STORAGE_ENV = (
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_REGION",
    "AWS_DEFAULT_REGION",
)

TokenList = Annotated[list[SecretStr], NoDecode]
RootList = Annotated[list[str], NoDecode]


def _split(value: object) -> object:
    """Comma-separated lists in the environment: ``a,b`` (a JSON list works too)."""
    if isinstance(value, str):
        value = value.strip()
        if value.startswith("["):
            import json

            return json.loads(value)
        return [v.strip() for v in value.split(",") if v.strip()]
    return value


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="NSTUDENT_", extra="ignore", frozen=True)

    environment: Literal["development", "production"] = Field(
        "development", description="production refuses to start without API tokens and with an embedded Ray"
    )
    data_dir: Path = Field(
        Path("nstudent-data"), description="local state: SQLite database, embedded Ray head, generated tokens"
    )
    storage_root: str | None = Field(
        None,
        description="where generations write their artifacts: a folder or s3://bucket/prefix; "
        "default <data_dir>/storage",
    )
    source_roots: RootList = Field(
        default_factory=list,
        description="folders and s3:// prefixes that requests may read sources and teachers from (comma-separated); "
        "the storage root is always allowed",
    )
    database_url: str | None = Field(
        None,
        validation_alias=AliasChoices("NSTUDENT_DATABASE_URL", "DATABASE_URL"),
        description="SQLAlchemy URL, e.g. postgresql+psycopg://user:pw@host/db; "
        "default SQLite at <data_dir>/nstudent.db",
    )
    ray_address: str | None = Field(
        None,
        validation_alias=AliasChoices("NSTUDENT_RAY_ADDRESS", "RAY_ADDRESS"),
        description="Ray dashboard URL that serves the Jobs API, e.g. http://raycluster-head-svc:8265; "
        "default: start a local Ray head under <data_dir>/ray",
    )
    ray_auth_token: SecretStr | None = Field(
        None,
        validation_alias=AliasChoices("NSTUDENT_RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN"),
        description="Ray's token (RAY_AUTH_MODE=token); the embedded head generates one under <data_dir>",
    )
    ray_num_cpus: int | None = Field(None, ge=1, description="CPUs of the embedded Ray head; default: all")
    ray_num_gpus: int | None = Field(None, ge=0, description="GPUs of the embedded Ray head; default: all")
    read_tokens: TokenList = Field(
        default_factory=list,
        description="bearer tokens that may read, comma-separated, each `name:token` (a bare token is `default`'s)",
    )
    write_tokens: TokenList = Field(
        default_factory=list,
        description="bearer tokens that may also start, cancel and retry generations (comma-separated `name:token`)",
    )
    admin_tokens: TokenList = Field(
        default_factory=list, description="bearer tokens that may do everything for every principal (`name:token`)"
    )
    principal_roots: dict[str, list[str]] = Field(
        default_factory=dict,
        description='source roots of each principal, added to the global ones (JSON: {"team-a": ["s3://a/"]})',
    )
    host: str = Field("127.0.0.1", description="address the API listens on")
    port: int = Field(8000, ge=1, le=65535, description="port the API listens on")
    poll_seconds: float = Field(2.0, gt=0, description="how often running generations are followed")
    progress_seconds: float = Field(
        2.0, gt=0, le=3600, description="how often running jobs rewrite their progress file (the progress bars' pace)"
    )
    max_page_size: int = Field(1000, ge=1, le=1000, description="largest `limit` of a paged listing")
    max_running_jobs: int = Field(
        4,
        ge=1,
        le=1000,
        description="generations whose jobs run on the cluster at once; the others wait as `queued`",
    )
    job_attempts: int = Field(
        3,
        ge=1,
        le=100,
        description="attempts of a job that fails for an infrastructure reason (lost node, out of memory, storage "
        "errors, a restarted Ray head) before its generation fails",
    )
    database_wait_seconds: float = Field(
        120.0,
        ge=0,
        le=3600,
        description="how long start-up waits for the database to answer (a database or proxy that starts beside "
        "the server) before the server gives up",
    )
    retry_backoff_seconds: float = Field(
        30.0,
        ge=0,
        le=3600,
        description="wait before the second attempt of a job; doubled for each further one, at most 10 minutes",
    )
    mlflow_tracking_uri: str | None = Field(
        None,
        validation_alias=AliasChoices("MLFLOW_TRACKING_URI"),
        description="MLflow tracking URI (needs nstudent[mlflow]); passed to every job, whose training runs log "
        "their parameters, metrics per checkpoint and final evaluation there",
    )

    def job_env(self) -> dict[str, str]:
        """Environment variables the control plane hands to each Ray job it submits."""
        return {"MLFLOW_TRACKING_URI": self.mlflow_tracking_uri} if self.mlflow_tracking_uri else {}

    @field_validator("read_tokens", "write_tokens", "admin_tokens", "source_roots", mode="before")
    @classmethod
    def _lists(cls, value: object) -> object:
        return _split(value)

    @field_validator("source_roots")
    @classmethod
    def _absolute_roots(cls, roots: list[str]) -> list[str]:
        return [_root(r) for r in roots]

    @field_validator("principal_roots")
    @classmethod
    def _absolute_principal_roots(cls, roots: dict[str, list[str]]) -> dict[str, list[str]]:
        return {name: [_root(r) for r in rs] for name, rs in roots.items()}

    @model_validator(mode="after")
    def _safe_in_production(self) -> Settings:
        if self.environment == "production":
            if not (self.write_tokens or self.admin_tokens):
                raise ValueError("production needs NSTUDENT_WRITE_TOKENS (and usually NSTUDENT_READ_TOKENS)")
            if not self.ray_address:
                raise ValueError("production needs RAY_ADDRESS: the dashboard URL of the Ray cluster")
        return self

    @property
    def storage(self) -> str:
        return self.storage_root or str((self.data_dir / "storage").resolve())

    @property
    def database(self) -> str:
        return self.database_url or f"sqlite:///{(self.data_dir / 'nstudent.db').resolve()}"

    @property
    def allowed_roots(self) -> list[str]:
        """Where any principal may read from: the global source roots and the storage root."""
        return [*self.source_roots, _root(self.storage)]


def _root(root: str) -> str:
    return access.normalize(root)


def env_names() -> set[str]:
    """Every environment variable the control plane reads: its settings and the storage variables."""
    names: set[str] = set(STORAGE_ENV)
    for name, field in Settings.model_fields.items():
        alias = field.validation_alias
        if isinstance(alias, AliasChoices):
            names.update(str(choice) for choice in alias.choices)
        else:
            names.add(f"NSTUDENT_{name.upper()}")
    return names


@functools.lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
