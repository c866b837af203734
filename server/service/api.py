"""The jobs API (protos/silotune/v1/jobs.proto) over gRPC, for operators only.

Mutual TLS, always: the server presents the coordinator's certificate (server/pki.py
``coordinator_files``) and demands a client certificate signed by the federation's CA in
the handshake (gRPC's BoringSSL refuses anything else before a call is read: no
certificate, a self-signed one, another CA's, one not for clientAuth such as the
coordinator's own server certificate). The handshake does not ask who the certificate
names, so every call is then checked by ``OperatorOnly``: the peer's certificate must be
an operator certificate (``server.pki.operator_name``: chain, dates, clientAuth,
OU=operator, the operator SAN); a client certificate of the CA for anything else is
refused with PERMISSION_DENIED. The operator's name is logged with each call.

Run-config values travel JSON-encoded (``3``, ``0.001``, ``true``, ``"macro-f1"``): the
types of the operator's `--set key=value` pairs survive the trip.
"""

from __future__ import annotations

import json
import logging
import queue
from collections.abc import Callable, Iterator, Mapping
from concurrent import futures
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import grpc
from cryptography import x509

from protos.silotune.v1 import jobs_pb2 as pb
from protos.silotune.v1 import jobs_pb2_grpc as pb_grpc
from runtime.keys import PkiError, load_ca
from server.events import EVENTS_FILE, Event, EventsFollower
from server.pki import operator_name
from server.service.manager import JobManager, SubmitError, Submission
from server.service.store import Job, JobNotFound, JobStateError
from server.specialists import RegistryError, Specialist

log = logging.getLogger("silotune.service")

CHUNK = 1 << 20   # FetchSpecialist's chunk size
EVENT_POLL = 0.5  # how often Watch looks for new events and for the job's end


# ------------------------------------------------------------------ messages
def encode_run_config(run_config: Mapping[str, Any]) -> dict[str, str]:
    return {str(key): json.dumps(value) for key, value in run_config.items()}


def decode_run_config(values: Mapping[str, str]) -> dict[str, Any]:
    out = {}
    for key, text in values.items():
        try:
            out[key] = json.loads(text)
        except json.JSONDecodeError:
            raise SubmitError(f"run config {key}={text!r}: values are JSON-encoded (3, 0.001, true, "
                              '"text")') from None
    return out


def job_message(job: Job) -> pb.Job:
    return pb.Job(id=job.id, specialist=job.specialist, state=job.state, run_id=job.run_id or 0,
                  run_dir=job.run_dir or "", created_at=job.created_at or "", started_at=job.started_at or "",
                  finished_at=job.finished_at or "", specialist_version=job.specialist_version or 0,
                  error=job.error or "", continue_from=job.continue_from or "",
                  run_config=encode_run_config(job.spec))


def specialist_message(s: Specialist) -> pb.Specialist:
    message = pb.Specialist(
        name=s.name, version=s.version, created_at=s.created_at, job_id=s.job_id, base_model=s.base_model,
        task_spec_json=json.dumps(s.task_spec), task_spec_fingerprint=s.task_spec_fingerprint or "",
        metrics_json=json.dumps(s.metrics), metric=s.metric or "", provenance_json=json.dumps(s.provenance),
        secure_aggregation=s.secure_aggregation, adapter_sha256=s.adapter_sha256, parent=s.parent or "",
        rounds=s.rounds or 0)
    if s.epsilon is not None:
        message.epsilon = s.epsilon
    return message


def event_message(event: Event) -> pb.RoundEvent:
    def text(key: str) -> str:
        value = event.get(key)
        return "" if value is None else str(value)

    def number(key: str) -> int:
        value = event.get(key)
        return value if isinstance(value, int) and not isinstance(value, bool) else 0

    summary = event.get("summary")
    return pb.RoundEvent(event=text("event"), time=text("time"), job_id=text("job_id"), round=number("round"),
                         org=text("org"), accepted=event.get("accepted") is True, detail=text("detail"),
                         sampled=number("sampled"), summary_json=json.dumps(summary) if summary is not None else "",
                         json=json.dumps(event))


# ------------------------------------------------------------------ who may call
class OperatorOnly(grpc.ServerInterceptor):
    """Every call: the peer's TLS certificate must be an operator certificate of the federation."""

    def __init__(self, ca_cert: Path | str) -> None:
        self.ca = load_ca(ca_cert)

    def intercept_service(self, continuation, handler_call_details):  # type: ignore[no-untyped-def]
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method.rpartition("/")[2]
        check = lambda context: self.check(context, method)  # noqa: E731
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                _checked_unary(handler.unary_unary, check), handler.request_deserializer, handler.response_serializer)
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(
                _checked_stream(handler.unary_stream, check), handler.request_deserializer, handler.response_serializer)
        raise RuntimeError(f"{method}: only unary requests are served")

    def check(self, context: grpc.ServicerContext, method: str) -> str:
        pems = context.auth_context().get("x509_pem_cert") or []
        if not pems:
            log.warning("jobs API: %s refused: no client certificate (%s)", method, context.peer())
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "an operator certificate is required")
        try:
            name = operator_name(self.ca, x509.load_pem_x509_certificate(pems[0]))
        except (PkiError, ValueError) as err:
            log.warning("jobs API: %s refused for %s: %s", method, context.peer(), err)
            context.abort(grpc.StatusCode.PERMISSION_DENIED,
                          "not an operator certificate of this federation (silotune pki operator-cert)")
        log.info("jobs API: %s by operator %s", method, name)
        return name


def _checked_unary(behavior: Callable, check: Callable) -> Callable:
    def call(request, context):  # type: ignore[no-untyped-def]
        check(context)
        return behavior(request, context)
    return call


def _checked_stream(behavior: Callable, check: Callable) -> Callable:
    def call(request, context):  # type: ignore[no-untyped-def]
        check(context)
        yield from behavior(request, context)
    return call


# ------------------------------------------------------------------ the calls
class JobsServicer(pb_grpc.JobsServicer):
    def __init__(self, manager: JobManager, *, poll: float = EVENT_POLL) -> None:
        self.manager = manager
        self.store = manager.store
        self.registry = manager.registry
        self.poll = poll

    def Submit(self, request: pb.SubmitRequest, context: grpc.ServicerContext) -> pb.Job:
        try:
            job = self.manager.submit(Submission(request.specialist, decode_run_config(request.run_config),
                                                 request.continue_from or None))
        except SubmitError as err:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(err))
        return job_message(job)

    def List(self, request: pb.ListRequest, context: grpc.ServicerContext) -> pb.JobList:
        return pb.JobList(jobs=[job_message(job) for job in self.store.list()])

    def GetJob(self, request: pb.JobRef, context: grpc.ServicerContext) -> pb.Job:
        return job_message(self._job(request.id, context))

    def Cancel(self, request: pb.JobRef, context: grpc.ServicerContext) -> pb.Job:
        self._job(request.id, context)
        try:
            return job_message(self.manager.cancel(request.id))
        except JobStateError as err:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(err))

    def Watch(self, request: pb.JobRef, context: grpc.ServicerContext) -> Iterator[pb.RoundEvent]:
        """The events so far, then each new one, until the job has ended and all are sent."""
        job = self._job(request.id, context)
        events: queue.Queue[Event] = queue.Queue()
        follower = EventsFollower(Path(job.run_dir) / EVENTS_FILE, events.put, poll=self.poll, from_start=True)
        try:
            while context.is_active():
                ended = self.store.get(job.id).ended
                if ended:
                    follower.stop()   # reads what is left
                yield from _drain(events)
                if ended:
                    return
                try:
                    yield event_message(events.get(timeout=self.poll))
                except queue.Empty:
                    pass
        finally:
            follower.stop()

    def ListSpecialists(self, request: pb.ListSpecialistsRequest,
                        context: grpc.ServicerContext) -> pb.SpecialistList:
        try:
            found = self.registry.list(request.name or None)
        except RegistryError as err:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(err))
        return pb.SpecialistList(specialists=[specialist_message(s) for s in found])

    def GetSpecialist(self, request: pb.SpecialistRef, context: grpc.ServicerContext) -> pb.Specialist:
        return specialist_message(self._specialist(request, context))

    def FetchSpecialist(self, request: pb.SpecialistRef, context: grpc.ServicerContext) -> Iterator[pb.FileChunk]:
        import hashlib

        specialist = self._specialist(request, context)
        for path in sorted(p for p in specialist.path.rglob("*") if p.is_file() and not p.is_symlink()):
            relative = path.relative_to(specialist.path).as_posix()
            digest = hashlib.sha256()
            with open(path, "rb") as f:
                chunk = f.read(CHUNK)
                while True:
                    digest.update(chunk)
                    following = f.read(CHUNK)
                    if not following:
                        yield pb.FileChunk(path=relative, data=chunk, sha256=digest.hexdigest())
                        break
                    yield pb.FileChunk(path=relative, data=chunk)
                    chunk = following

    def _job(self, job_id: str, context: grpc.ServicerContext) -> Job:
        try:
            return self.store.get(job_id)
        except JobNotFound as err:
            context.abort(grpc.StatusCode.NOT_FOUND, str(err))

    def _specialist(self, ref: pb.SpecialistRef, context: grpc.ServicerContext) -> Specialist:
        try:
            return self.registry.get(ref.name, ref.version or None)
        except RegistryError as err:
            context.abort(grpc.StatusCode.NOT_FOUND, str(err))


def _drain(events: queue.Queue[Event]) -> Iterator[pb.RoundEvent]:
    while True:
        try:
            yield event_message(events.get_nowait())
        except queue.Empty:
            return


# ------------------------------------------------------------------ the server and a client
class JobsApi:
    """The jobs API's gRPC server on ``host:port`` (0: a free port, then ``.port``)."""

    def __init__(self, manager: JobManager, tls: Any, host: str, port: int = 0, *,
                 poll: float = EVENT_POLL, workers: int = 16) -> None:
        self.manager, self.tls, self.host, self.port = manager, tls, host, port
        self.poll, self.workers = poll, workers
        self.server: grpc.Server | None = None

    def start(self) -> JobsApi:
        credentials = grpc.ssl_server_credentials(
            [(Path(self.tls.key).read_bytes(), Path(self.tls.cert).read_bytes())],
            root_certificates=Path(self.tls.ca_cert).read_bytes(), require_client_auth=True)
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="jobs-api"),
                                  interceptors=[OperatorOnly(self.tls.ca_cert)])
        pb_grpc.add_JobsServicer_to_server(JobsServicer(self.manager, poll=self.poll), self.server)
        self.port = self.server.add_secure_port(f"{_grpc_host(self.host)}:{self.port}", credentials)
        if not self.port:
            raise OSError(f"the jobs API cannot listen on {self.host}")
        self.server.start()
        return self

    @property
    def address(self) -> str:
        return f"{_grpc_host(self.host)}:{self.port}"

    def stop(self, grace: float = 5.0) -> None:
        if self.server is not None:
            self.server.stop(grace).wait(grace + 1)
            self.server = None


def _grpc_host(host: str) -> str:
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


@contextmanager
def connect(address: str, ca_cert: Path | str, cert: Path | str | None,
            key: Path | str | None) -> Iterator[pb_grpc.JobsStub]:
    """A client of the jobs API at ``address`` (HOST:PORT) presenting an operator certificate
    (``cert``/``key``; None: none, which the server refuses)."""
    credentials = grpc.ssl_channel_credentials(
        root_certificates=Path(ca_cert).read_bytes(),
        private_key=Path(key).read_bytes() if key else None,
        certificate_chain=Path(cert).read_bytes() if cert else None)
    with grpc.secure_channel(address, credentials) as channel:
        yield pb_grpc.JobsStub(channel)
