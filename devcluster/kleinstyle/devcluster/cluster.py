"""`DevCluster`: the whole operator flow on one machine, with no Kubernetes.

It composes a root folder (volumes, pod rootfs, logs, kubeconfig), the API emulator with the CRDs and an optional
admission hook, the local executor for Jobs, and an optional operator coroutine. The emulator and the operator each
run in their own thread and event loop (see operator_thread.py for why); the executor runs in the caller's loop.
The operator can be stopped and started again while the emulator keeps every object, which is how an operator
restart is tested. Stopping order on exit: operator, executor (kills pod processes), emulator.

    async with DevCluster(crds=crds, admit=admit, operator=run_operator) as cluster:
        await cluster.apply(yaml.safe_load_all(open("examples/styleboard.yaml")))
        board = await cluster.wait_for(lambda: cluster.get("styleboards", "default", "demo"), timeout=60)
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import shutil
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

from .client import KubeClient
from .emulator import Emulator
from .executor import Executor
from .operator_thread import OperatorFactory, OperatorThread
from .store import Admit
from .wiring import point_kubernetes_client

logger = logging.getLogger(__name__)

T = TypeVar("T")

DEFAULT_ROOT = ".kleinstyle-dev"


class DevCluster:
    """An API emulator, a Job executor and (optionally) the operator, sharing one root folder.

    `apply`, `get`, `list` and `delete` go over HTTP like kubectl; `emulator` exposes the request log and direct
    reads for assertions. With `configure_clients` (the default) `KUBECONFIG` and the `kubernetes` client point
    at the emulator while the cluster runs.
    """

    def __init__(
        self,
        root: str | Path = DEFAULT_ROOT,
        *,
        crds: Iterable[dict[str, Any]] = (),
        admit: Admit | None = None,
        operator: OperatorFactory | None = None,
        run_jobs: bool = True,
        parallelism: int = 2,
        resync_interval: float = 2.0,
        default_command: Sequence[str] | None = None,
        namespace: str = "default",
        configure_clients: bool = True,
        clean: bool = False,
        operator_stop_timeout: float = 30.0,
    ) -> None:
        self.root = Path(root).resolve()
        self.namespace = namespace
        self.emulator = Emulator(list(crds), admit=admit, logs_dir=self.root / "logs")
        self._operator_factory = operator
        self._run_jobs = run_jobs
        self._parallelism = parallelism
        self._resync_interval = resync_interval
        self._default_command = default_command
        self._configure_clients = configure_clients
        self._clean = clean
        self._operator_stop_timeout = operator_stop_timeout
        self._client: KubeClient | None = None
        self.executor: Executor | None = None
        self._restore_clients: Callable[[], None] | None = None
        self._operator: OperatorThread | None = None

    @property
    def url(self) -> str:
        return self.emulator.url

    @property
    def kubeconfig_path(self) -> Path:
        return self.root / "kubeconfig"

    @property
    def client(self) -> KubeClient:
        if self._client is None:
            raise RuntimeError("the dev cluster is not running")
        return self._client

    # --- lifecycle -----------------------------------------------------------------------------------------------

    async def __aenter__(self) -> DevCluster:
        if self._clean and self.root.exists():
            shutil.rmtree(self.root)
        self.root.mkdir(parents=True, exist_ok=True)
        await self.emulator.__aenter__()
        try:
            self.emulator.kubeconfig(self.kubeconfig_path, namespace=self.namespace)
            if self._configure_clients:
                self._restore_clients = point_kubernetes_client(self.kubeconfig_path)
            self._client = KubeClient(self.url, self.emulator.kinds)
            if self._run_jobs:
                self.executor = Executor(
                    self._client,
                    self.root,
                    api_url=self.url,
                    parallelism=self._parallelism,
                    resync_interval=self._resync_interval,
                    default_command=self._default_command,
                )
                self.executor.start()
            if self._operator_factory is not None:
                await self.start_operator()
        except BaseException:
            await self._shutdown()
            raise
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self._shutdown()

    async def _shutdown(self) -> None:
        try:
            await self.stop_operator()
        finally:
            if self.executor is not None:
                await self.executor.stop()
                self.executor = None
            if self._client is not None:
                await self._client.close()
                self._client = None
            if self._restore_clients is not None:
                self._restore_clients()
                self._restore_clients = None
            await self.emulator.__aexit__(None, None, None)

    async def start_operator(self, operator: OperatorFactory | None = None) -> None:
        """Start the operator (the one given at construction unless another is passed) in its own thread and loop.

        `operator(stop)` is called there and must return once `stop` (an asyncio.Event of that loop) is set."""
        if self._operator is not None and self._operator.running:
            raise RuntimeError("the operator is already running")
        factory = operator or self._operator_factory
        if factory is None:
            raise RuntimeError("no operator was given")
        self._operator_factory = factory
        self._operator = OperatorThread(factory)
        await asyncio.to_thread(self._operator.start)

    async def stop_operator(self) -> None:
        """Ask the operator to stop and wait for it; cancel it after `operator_stop_timeout`. Re-raises its crash."""
        operator, self._operator = self._operator, None
        if operator is not None:
            await operator.stop(self._operator_stop_timeout)

    async def restart_operator(self) -> None:
        """Stop the operator and start it again; the emulator keeps its objects, as a cluster would."""
        await self.stop_operator()
        await self.start_operator()

    async def operator_exited(self) -> None:
        """Return when the operator stops on its own (a crash is re-raised); returns at once if none is running."""
        if self._operator is not None:
            await self._operator.exited()

    @property
    def operator_running(self) -> bool:
        return self._operator is not None and self._operator.running

    def _operator_crash(self) -> BaseException | None:
        result = self._operator.result if self._operator is not None else None
        return result.exception() if result is not None and result.done() else None

    # --- kubectl-like access -------------------------------------------------------------------------------------

    async def apply(self, docs: Iterable[dict[str, Any] | None]) -> list[dict[str, Any]]:
        """Create or update each document as `kubectl apply` does; raises ApiError with the server's message."""
        return [await self.client.apply(doc, self.namespace) for doc in docs if doc]

    async def get(self, resource: str, namespace: str | None, name: str) -> dict[str, Any] | None:
        """The object, or None. `resource` is a plural, kind, short name or `group/version/plural`."""
        return await self.client.get_or_none(resource, namespace, name)

    async def list(
        self, resource: str, namespace: str | None = None, label_selector: str | None = None
    ) -> list[dict[str, Any]]:
        return await self.client.list(resource, namespace, label_selector=label_selector)

    async def delete(self, resource: str, namespace: str | None, name: str) -> dict[str, Any] | None:
        return await self.client.delete(resource, namespace, name)

    async def wait_for(
        self, predicate: Callable[[], T | Awaitable[T]], timeout: float = 30.0, interval: float = 0.1
    ) -> T:
        """Poll `predicate` (sync or async) until it returns something truthy; return that. TimeoutError after
        `timeout` seconds, and at once if the operator crashed meanwhile (with its exception as the cause)."""
        deadline = time.monotonic() + timeout
        while True:
            result = predicate()
            if inspect.isawaitable(result):
                result = await result
            if result:
                return result  # type: ignore[return-value]
            crash = self._operator_crash()
            if crash is not None:
                raise TimeoutError("the operator crashed while waiting") from crash
            if time.monotonic() >= deadline:
                raise TimeoutError(f"condition not met within {timeout}s")
            await asyncio.sleep(interval)
