"""Ray jobs through the Jobs API (the dashboard's HTTP server): submit, follow, stop.

Submission ids are chosen by the caller and recorded before submitting, so a restart that submits again
finds the job already there instead of starting a second one.
"""

from __future__ import annotations

import logging
import re
import shlex
from dataclasses import dataclass

from ray.job_submission import JobSubmissionClient

from service.redact import redact
from service.states import JobStatus

log = logging.getLogger(__name__)


class RayUnavailable(RuntimeError):
    """The Ray cluster's Jobs API cannot be reached."""


@dataclass
class JobState:
    status: JobStatus
    message: str = ""


class Jobs:
    def __init__(
        self, address: str, token: str | None = None, timeout: float = 10.0, env: dict[str, str] | None = None
    ):
        self.address, self.token, self.timeout = address, token, timeout
        self.env = env or {}  # set in every job's runtime environment (e.g. MLFLOW_TRACKING_URI)
        self._client: JobSubmissionClient | None = None

    @property
    def client(self) -> JobSubmissionClient:
        if self._client is None:
            headers = {"Authorization": f"Bearer {self.token}"} if self.token else None
            try:
                self._client = JobSubmissionClient(self.address, headers=headers)
            except Exception as e:  # connection refused, DNS, auth: all mean "not reachable now"
                raise RayUnavailable(redact(f"Ray Jobs API at {self.address}: {e}")) from e
        return self._client

    def ping(self) -> None:
        try:
            self.client.get_version()
        except Exception as e:
            raise self._unavailable(e) from e

    def submit(self, submission_id: str, args: list[str], *, env: dict[str, str] | None = None) -> None:
        """Start ``nstudent <args>`` as a Ray job unless ``submission_id`` already exists."""
        entrypoint = shlex.join(["nstudent", *args])
        env = {**self.env, **(env or {})}
        try:
            self.client.submit_job(
                entrypoint=entrypoint,
                submission_id=submission_id,
                runtime_env={"env_vars": env} if env else None,
                metadata={"app": "nstudent"},
            )
            log.info("submitted %s: %s", submission_id, entrypoint)
        except RuntimeError as e:
            if "already exists" in str(e):
                log.info("%s was already submitted", submission_id)
                return
            raise self._unavailable(e) from e
        except Exception as e:
            raise self._unavailable(e) from e

    def state(self, submission_id: str) -> JobState:
        try:
            info = self.client.get_job_info(submission_id)
        except RuntimeError as e:
            if "does not exist" in str(e) or "404" in str(e):
                return JobState(JobStatus.MISSING)
            raise self._unavailable(e) from e
        except Exception as e:
            raise self._unavailable(e) from e
        return JobState(JobStatus(str(info.status.value)), info.message or "")

    def failure(self, submission_id: str) -> str:
        """The job's error in one line: the last exception line of its logs, else Ray's message."""
        try:
            logs = self.client.get_job_logs(submission_id)
        except Exception:
            logs = ""
        errors = [line.strip() for line in logs.splitlines() if _EXCEPTION_LINE.match(line.strip())]
        if errors:
            return errors[-1][:1000]
        return self.state(submission_id).message[:1000] or "the job failed"

    def stop(self, submission_id: str) -> None:
        try:
            self.client.stop_job(submission_id)
        except RuntimeError as e:
            if "does not exist" not in str(e):
                raise self._unavailable(e) from e
        except Exception as e:
            raise self._unavailable(e) from e

    def stop_all(self) -> None:
        """Stop every job still pending or running (before the cluster itself is stopped)."""
        try:
            for job in self.client.list_jobs():
                if job.submission_id and JobStatus(str(job.status.value)).active:
                    self.stop(job.submission_id)
        except Exception as e:
            log.warning("could not stop the cluster's jobs: %s", e)

    def _unavailable(self, e: Exception) -> RayUnavailable:
        self._client = None  # reconnect next time
        if isinstance(e, RayUnavailable):
            return e
        return RayUnavailable(redact(f"Ray Jobs API at {self.address}: {e}"))


_EXCEPTION_LINE = re.compile(r"^([A-Za-z_][\w.]*(Error|Exception|Interrupt)|[\w.]*\.\w+Error): ")
