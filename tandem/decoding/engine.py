"""The in-process engine: the request loop of `tandem.decoding.rounds` over workers in this process.

The orchestrator service runs the same loop over the Primary and Secondary services, so both produce the same tokens;
see `tandem.decoding.rounds` for the modes and the round structure.
"""

from __future__ import annotations

import uuid
from collections.abc import Generator, Sequence

from tandem.config import BatchingConfig, SamplingParams, SpecConfig
from tandem.decoding.rounds import GenerationResult, GenerationStats, Request, run_request
from tandem.decoding.speculative import Router
from tandem.decoding.workers import DrafterWorker, PrimaryWorker
from tandem.errors import InvalidRequestError
from tandem.model.drafter import DrafterRunner
from tandem.model.primary import PrimaryRunner

__all__ = ["Engine", "GenerationResult", "GenerationStats"]


class Engine:
    """Runs requests through one primary and up to two drafters (Tandem and vanilla) in this process."""

    def __init__(
        self,
        primary: PrimaryRunner,
        tandem_drafter: DrafterRunner | None = None,
        vanilla_drafter: DrafterRunner | None = None,
        *,
        routers: dict[str, Router | None] | None = None,
        stop_token_ids: Sequence[int] = (),
        batching: BatchingConfig = BatchingConfig(),
        prefix_rows: int = 4,
    ) -> None:
        if tandem_drafter is not None:
            if not tandem_drafter.cfg.tandem:
                raise ValueError("tandem_drafter must be a Tandem drafter (cfg.tandem=True)")
            if tuple(primary.taps) != tandem_drafter.cfg.tapped_layers:
                raise ValueError(
                    f"primary taps {primary.taps} differ from the drafter's layers {tandem_drafter.cfg.tapped_layers}"
                )
        if vanilla_drafter is not None and vanilla_drafter.cfg.tandem:
            raise ValueError("vanilla_drafter must have cfg.tandem=False")
        for d in (tandem_drafter, vanilla_drafter):
            if d is not None and d.cfg.vocab_size != primary.cfg.vocab_size:
                raise ValueError(f"drafter vocabulary {d.cfg.vocab_size} != primary's {primary.cfg.vocab_size}")
        self.primary = primary
        self.primary_worker = PrimaryWorker(primary, batching, prefix_rows)
        routers = routers or {}
        tandem = DrafterWorker(tandem_drafter, routers.get("tandem"), batching) if tandem_drafter is not None else None
        vanilla = (
            DrafterWorker(vanilla_drafter, routers.get("vanilla"), batching) if vanilla_drafter is not None else None
        )
        self.drafters = {"tandem": tandem, "tandem-speed": tandem, "speed": vanilla}
        self.stop_token_ids = frozenset(stop_token_ids)

    @property
    def max_len(self) -> int:
        return self.primary.max_len

    def generate(
        self,
        prompt_ids: Sequence[int],
        *,
        mode: str = "tandem-speed",
        max_tokens: int = 64,
        sampling: SamplingParams = SamplingParams(),
        spec: SpecConfig = SpecConfig(),
    ) -> GenerationResult:
        """Runs a request to completion; see `stream` for the arguments."""
        tokens: list[int] = []
        stream = self.stream(prompt_ids, mode=mode, max_tokens=max_tokens, sampling=sampling, spec=spec)
        while True:
            try:
                tokens.extend(next(stream))
            except StopIteration as done:
                result: GenerationResult = done.value
                result.token_ids = tokens
                return result

    def stream(
        self,
        prompt_ids: Sequence[int],
        *,
        mode: str = "tandem-speed",
        max_tokens: int = 64,
        sampling: SamplingParams = SamplingParams(),
        spec: SpecConfig = SpecConfig(),
    ) -> Generator[list[int], None, GenerationResult]:
        """Validates a request now and returns a generator of the tokens each primary pass commits.

        Args:
            prompt_ids: the prompt's token ids (non-empty).
            mode: one of tandem.config.MODES.
            max_tokens: most tokens to generate (>= 1).
            sampling: temperature/top-k/top-p/seed; greedy when temperature < MIN_TEMPERATURE (0 included).
            spec: γ_max, τ and the proposal's top-K.

        Raises:
            InvalidRequestError: for a request that cannot run.
        """
        req = Request(tuple(int(t) for t in prompt_ids), mode, max_tokens, sampling, spec)
        limit = req.validate(self.primary.cfg.vocab_size, self.max_len)
        session = uuid.uuid4().hex
        drafter = None
        if mode != "primary":
            worker = self.drafters.get(mode)
            if worker is None:
                raise InvalidRequestError(f"mode {mode!r} needs a drafter this engine was not given")
            drafter = worker.open(session, sampling, req.drafter_spec)
        return run_request(
            req, session, self.primary_worker, drafter, max_tokens=limit, stop_token_ids=self.stop_token_ids
        )
