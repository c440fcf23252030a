"""The public Orchestrator servicer: translates GenerateRequest/GenerateResponse around `orchestrator.core`."""

from __future__ import annotations

from collections.abc import Iterator

import grpc

from orchestrator.clients import ModelServiceError
from orchestrator.core import Orchestrator
from orchestrator.generation import Chunk, GenerateParams, Generation
from tandem.errors import OverloadedError, TandemError
from tandemrpc.convert import FINISH_ENUMS, mode_name, sampling_from_proto
from tandemrpc.server import status_for
from tandemrpc.v1 import tandem_pb2 as pb
from tandemrpc.v1 import tandem_pb2_grpc as pb_grpc


def params_from_proto(r: pb.GenerateRequest) -> GenerateParams:
    which = r.WhichOneof("input")
    return GenerateParams(
        text=r.text if which == "text" else None,
        token_ids=tuple(r.token_ids.ids) if which == "token_ids" else None,
        chat=tuple((m.role, m.content) for m in r.chat.messages) if which == "chat" else None,
        sampling=sampling_from_proto(r.sampling),
        max_tokens=r.max_tokens,
        stop=tuple(r.stop),
        mode=mode_name(r.mode),
        gamma_max=r.gamma_max,
        tau=r.tau if r.HasField("tau") else None,
        tau_first=r.tau_first if r.HasField("tau_first") else None,
        min_accepted=r.min_accepted if r.HasField("min_accepted") else None,
        lookup_ngram=r.lookup_ngram if r.HasField("lookup_ngram") else None,
        request_id=r.request_id,
    )


def chunk_to_proto(c: Chunk, request_id: str) -> pb.GenerateResponse:
    out = pb.GenerateResponse(text=c.text, token_ids=c.token_ids, request_id=request_id)
    if c.finish_reason is not None and c.result is not None:
        s = c.result.stats
        out.finish_reason = FINISH_ENUMS[c.finish_reason]  # type: ignore[assignment]
        out.usage.CopyFrom(pb.Usage(prompt_tokens=s.prompt_tokens, completion_tokens=s.output_tokens))
        out.stats.CopyFrom(
            pb.SpeculationStats(
                rounds=s.rounds,
                drafted_tokens=s.drafted_tokens,
                accepted_tokens=s.accepted_tokens,
                accepted_per_position=s.accepted_per_position,
                mean_acceptance_length=s.mean_acceptance_length,
                ttft_s=s.ttft_s,
                elapsed_s=s.elapsed_s,
                declined_rounds=s.declined_rounds,
                paused_steps=s.paused_steps,
                lookup_rounds=s.lookup_rounds,
                lookup_drafted_tokens=s.lookup_drafted_tokens,
                lookup_accepted_tokens=s.lookup_accepted_tokens,
            )
        )
    return out


class OrchestratorServicer(pb_grpc.OrchestratorServicer):
    def __init__(self, core: Orchestrator) -> None:
        self.core = core

    def Generate(self, request: pb.GenerateRequest, context: grpc.ServicerContext) -> Iterator[pb.GenerateResponse]:
        generation: Generation | None = None
        try:
            generation = self.core.generate(params_from_proto(request), context.time_remaining())
            context.add_callback(generation.cancel)  # cancellation or deadline: release both sessions at once
            for chunk in generation:
                if not context.is_active():
                    break
                yield chunk_to_proto(chunk, request.request_id)
        except ModelServiceError as e:
            context.abort(e.code, str(e))
        except TandemError as e:
            if isinstance(e, OverloadedError):  # gRPC's retry-pushback key: clients may wait this long and retry
                context.set_trailing_metadata((("grpc-retry-pushback-ms", str(round(1000 * e.retry_after_s))),))
            context.abort(status_for(e), str(e))
        finally:
            if generation is not None:
                generation.close()
