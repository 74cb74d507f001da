"""The serving engine: concurrent requests decoded together by transformers' continuous batching.

Every decode step runs one forward pass over the new tokens of every active sequence, so each
MoE layer sends one request per agent carrying all of them. transformers' continuous batching
(`init_continuous_batching`) owns the schedule: paged KV cache, prompts joining between steps,
long prompts prefilled in chunks, finished and cancelled sequences leaving. We plug into it at
two points:
- a forward pre-hook maps the batch's tokens to their requests, so the MoE layers drop with
  each request's θ and charge each request's own calls and drops (`ledger.py`); a request
  with a latency target gets, per sequence and step, the θ its controller picks
  (`latency_target.py`), told each token's measured latency in `_advance`;
- a continuous-batching logits processor (`sampler.BatchSampler`) picks every row's token with
  that request's own sampling and seed, and streams text, stop strings and logprobs.

Threads: the library's generation thread runs the forward passes, hence every ZeroMQ call of
the MoE layers. Nothing a request does ends that thread: an exception in one sequence's
decoding fails that request, one in a batched step (`step_guard`) the requests of that step,
and the others go on. The admission thread here (`_loop`) tokenizes requests, hands them to the
library, and, only inside the library's `pause()` (the generation thread parked between steps),
scores echo prompts and polls probes while idle: the sockets are never used by two threads at
once. Front ends `submit` a Request and read its Events through the request's `emit`.
"""

from __future__ import annotations

import collections
import contextlib
import math
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field

import torch
from transformers import ContinuousBatchingConfig, GenerationConfig

from basestation.engine_errors import (
    BadRequest,
    EngineError,
    EngineStopped,
    ExpertLost,
    GenerationFailed,
    Overloaded,
    check_room,
)
from basestation.generate import Sampling, prompt_logits
from basestation.jobs import Accepted, Delta, Failed, Finished, Job, Request, emit
from basestation.latency_target import Pacer, mean_theta, start
from basestation.latency_target import report as target_report
from basestation.ledger import RequestLedger, lost_message
from basestation.metrics import EngineMetrics
from basestation.openai_api import Defaults, completion_budget
from basestation.sampler import BatchSampler, RowSampler, greedy, processor_list
from basestation.sequence import ChoiceDecoder, token_logprobs
from basestation.step_guard import guard_steps

IDLE_POLL_S = 0.05  # admission wake-ups, and probe polls while nothing decodes
STOP_JOIN_S = 10.0  # how long stop() waits for each thread
KV_PAGE_TOKENS = 64  # tokens per page of the paged KV cache
# a generation loop that died anyway (step_guard's clean-up raised) is started again this many
# times; one that keeps dying is a bug to see (/health says 503), not to hide
MAX_LOOP_RESTARTS = 3
ERROR_TEXT_CHARS = 300  # of an exception's text in a client's error message


@dataclass(eq=False)
class _Run:
    """A request being decoded: its choices, and its share of the MoE work."""
    request: Request
    prompt_tokens: int
    ledger: RequestLedger
    decoders: list[ChoiceDecoder]
    latencies_ms: list[list[float]]
    live: set[str] = field(default_factory=set)  # continuous-batching ids still decoding
    # per choice and token, as latencies_ms: the wait on agents (ms), the step's slowest agent
    waits_ms: list[list[float]] = field(init=False)
    slowest: list[list[str | None]] = field(init=False)
    first_token_s: float | None = None  # time.monotonic() of its first token
    # per choice, its latency target's controller; None: the request gave θ, not a target
    pacers: list[Pacer] | None = None
    done: bool = False  # its last event (Finished or Failed) sent, or it was cancelled

    def __post_init__(self):
        self.waits_ms = [[] for _ in self.latencies_ms]
        self.slowest = [[] for _ in self.latencies_ms]


@dataclass(eq=False)
class _Sequence:
    run: _Run
    index: int
    sampler: RowSampler
    last_s: float
    last_wait_s: float = 0.0  # the dispatcher's wait clock (MoeStats.network_s) at last_s


class Engine:
    def __init__(self, session, defaults: Defaults, max_queue: int = 16, max_batch: int = 16,
                 prefill_chunk_tokens: int = 256):
        self.session = session
        self.defaults = defaults
        self.max_queue = max_queue
        self.max_batch = max_batch
        self.prefill_chunk_tokens = prefill_chunk_tokens
        self.metrics = EngineMetrics()
        base = session.base
        self.tokenizer = base.tokenizer
        text_config = base.config.get_text_config() if hasattr(base.config, "get_text_config") \
            else base.config
        self.context = int(getattr(text_config, "max_position_embeddings", 0)
                           or self.tokenizer.model_max_length)
        self.vocab_size = int(text_config.vocab_size)
        eos = base.model.generation_config.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
        self._pending: collections.deque[Request] = collections.deque()
        self._runs: dict[str, _Run] = {}  # request id -> run
        self._sequences: dict[str, _Sequence] = {}  # continuous-batching id -> sequence
        self._held: dict[Request, int] = {}  # request not yet ended -> its prompts
        self._lock = threading.Condition()
        self._stopping = False
        self._manager = None
        self._hooks = []
        self._step = contextlib.ExitStack()  # the batch plan of the step being decoded
        self._restarts = 0
        self.live = None  # a live_tap.LiveTap, told of each batched step (serve's dashboard)
        self._thread = threading.Thread(target=self._loop, name="admission", daemon=True)

    # --- called from any thread -----------------------------------------------------------------

    def start(self) -> None:
        model = self.session.base.model
        generation = GenerationConfig(do_sample=False, eos_token_id=[],
                                      pad_token_id=self.tokenizer.pad_token_id or 0,
                                      max_new_tokens=self.defaults.max_tokens)
        batching = ContinuousBatchingConfig(
            page_size=KV_PAGE_TOKENS,
            num_blocks=math.ceil(self.max_batch * self.context / KV_PAGE_TOKENS),
            max_batch_tokens=self.prefill_chunk_tokens, max_requests_per_batch=self.max_batch,
            # a shared prefix would reuse KV computed at another request's θ
            allow_block_sharing=False,
            use_async_batching=False, use_cuda_graph=False, auto_switch_to_flash=False)
        self._manager = model.init_continuous_batching(generation_config=generation,
                                                       continuous_batching_config=batching)
        self._manager.logit_processor = processor_list(BatchSampler(self._pick))
        guard_steps(self._manager, self._step_failed)
        self._hooks = [model.register_forward_pre_hook(self._before_forward, with_kwargs=True),
                       model.register_forward_hook(self._after_forward, with_kwargs=True,
                                                   always_call=True)]
        with torch.inference_mode():  # the generation thread inherits it
            self._manager.start()
        self._thread.start()

    def alive(self) -> bool:
        return self._thread.is_alive() and self._manager is not None \
            and self._manager.is_running()

    @property
    def queue_depth(self) -> int:
        return len(self._pending)

    def submit(self, request: Request) -> None:
        """Queue a request. Raises EngineStopped, or Overloaded when its prompts find no place
        in the batch nor in the queue."""
        prompts = len(request.job.prompts) if request.job.prompts is not None else 1
        with self._lock:
            if self._stopping:
                raise EngineStopped("the server is shutting down")
            for gone in [r for r in self._held if r.cancelled.is_set()]:
                del self._held[gone]  # cancelled, or its front end left
            try:
                check_room(sum(self._held.values()), prompts, self.max_batch, self.max_queue)
            except Overloaded:
                self.metrics.rejected += 1
                raise
            self._held[request] = prompts
            self._pending.append(request)
            self._lock.notify()

    def cancel(self, request: Request) -> None:
        """Stop a request: taken off the queue, or its sequences stopped after their current
        step (their KV cache freed, their place given to the next request)."""
        request.cancelled.set()
        with self._lock:
            if request in self._pending:
                self._pending.remove(request)
                self.metrics.cancelled += 1
                return
            run = self._runs.get(request.id)
            if run is None or not self._take_run(run):
                return
            run.done = True  # its front end is gone: no event to send
            self.metrics.cancelled += 1

    def stop(self) -> None:
        with self._lock:
            self._stopping = True
            pending, self._pending = list(self._pending), collections.deque()
            runs = list(self._runs.values())
            self._lock.notify()
        for request in pending:
            request.cancelled.set()
            emit(request, Failed(EngineStopped("the server is shutting down")))
        for run in runs:
            self.cancel(run.request)
        if self._thread.is_alive():
            self._thread.join(STOP_JOIN_S)
        if self._manager is not None and self._manager.is_running():
            self._manager.stop(block=True, timeout=STOP_JOIN_S)
        for hook in self._hooks:
            hook.remove()

    # --- the admission thread -------------------------------------------------------------------

    def _loop(self) -> None:
        last_poll_s = 0.0
        while True:
            with self._lock:
                if self._stopping:
                    return
                request = self._pending.popleft() if self._pending and self._room() else None
                idle = not self._sequences and not self._pending
            if request is not None:
                try:
                    self._admit(request)
                except Exception as e:  # a bug must fail one request, not the server
                    report(e, f"admitting request {request.id}")
                    run = self._runs.get(request.id)
                    if run is not None:  # some of its sequences may be decoding already
                        self._fail_run(run, internal_error(e))
                    else:
                        self._fail(request, internal_error(e))
                continue
            self._collect_failures()
            if not self._manager.is_running() and not self._restart_generation():
                return
            if idle and time.monotonic() - last_poll_s >= IDLE_POLL_S:
                try:
                    with self._manager.pause():  # dead agents come back while idle
                        self.session.poll_probes(0.0)
                except RuntimeError:
                    # the generation loop ended between is_running() and the pause (the
                    # library then refuses or ends the pause): restarted on the next turn
                    if self._manager.is_running():
                        raise
                    continue
                last_poll_s = time.monotonic()
            with self._lock:
                if not self._stopping and not (self._pending and self._room()):
                    self._lock.wait(IDLE_POLL_S)

    def _room(self) -> bool:
        return not self._sequences or len(self._sequences) < self.max_batch

    def encode(self, job: Job) -> list[list[int]]:
        """The token ids of a job's prompts (or its chat, through the template); the one owner
        of tokenization: serve calls it on its worker threads, off the admission path. Raises
        BadRequest."""
        if job.messages is not None:
            try:
                ids = self.tokenizer.apply_chat_template(list(job.messages),
                                                         add_generation_prompt=True,
                                                         return_dict=True)["input_ids"]
            except Exception as e:  # jinja's raise_exception: e.g. roles must alternate
                raise BadRequest("messages", f"the chat template refused them: {e}") from None
            return [list(ids)]
        prompts = [list(p) if isinstance(p, tuple) else self.tokenizer(p).input_ids
                   for p in job.prompts]
        if not all(prompts):
            raise BadRequest("prompt", "empty after tokenization")
        return prompts

    def _admit(self, request: Request) -> None:
        job, params = request.job, request.job.params
        try:
            prompts = self.encode(job)
            budgets = [completion_budget(len(ids), params.max_tokens, self.defaults.max_tokens,
                                         self.context) for ids in prompts]
        except EngineError as e:
            self._fail(request, e)
            return
        prompt_tokens = sum(map(len, prompts))
        emit(request, Accepted(prompt_tokens=prompt_tokens))
        runtime = self.session.runtime
        run = _Run(request, prompt_tokens, runtime.new_ledger(), [], [[] for _ in prompts])
        if params.latency_target_ms is not None:
            run.pacers = [Pacer(start(params.latency_target_ms)) for _ in prompts]
        for index, ids in enumerate(prompts):
            echo_text, prompt_lp = "", ([], [], [])
            if job.echo:
                prompt = job.prompts[index]
                echo_text = prompt if isinstance(prompt, str) else self.tokenizer.decode(ids)
                if job.logprobs is not None:
                    prompt_lp = self._prompt_logprobs(run, ids, job.logprobs)
            run.decoders.append(ChoiceDecoder(index, self.tokenizer, params, budgets[index],
                                              self.eos_ids, echo_text, job.logprobs, prompt_lp))
        generation = self.session.base.model.generation_config
        eos = [] if params.ignore_eos else sorted(self.eos_ids)
        with self._lock:
            if request.cancelled.is_set():
                self.metrics.cancelled += 1
                return
            self._runs[request.id] = run
            now, wait_s = time.perf_counter(), runtime.stats.network_s
            if run.pacers is None:  # a target's θ is known when it finishes
                self.metrics.theta.observe(params.theta)
            for index, (ids, budget) in enumerate(zip(prompts, budgets)):
                if budget == 0:
                    run.decoders[index].finish_reason = "length"
                    continue
                cb_id = f"{request.id}:{index}"
                sampler = RowSampler(generation, Sampling(params.temperature, params.top_p,
                                                          params.seed), stream=index)
                self._sequences[cb_id] = _Sequence(run, index, sampler, now, wait_s)
                run.live.add(cb_id)
                self._manager.add_request(ids, request_id=cb_id, max_new_tokens=budget,
                                          eos_token_id=eos)
            if not run.live:  # every choice had a budget of 0
                self._runs.pop(request.id)
                self._finish(run)

    def _prompt_logprobs(self, run: _Run, ids: list[int], top: int):
        """The prompt's own token logprobs (echo), from one forward pass at the request's θ,
        run while the generation thread is parked."""
        with self._manager.pause():
            logits = prompt_logits(self.session, torch.tensor([ids]),
                                   theta=run.request.job.params.theta, ledgers=[run.ledger])
        tokens, values, tops = token_logprobs(self.tokenizer, logits[:-1], ids[1:], top)
        return ([self.tokenizer.decode([ids[0]])] + tokens, [None] + values, [None] + tops)

    def _collect_failures(self) -> None:
        """The library reports a request it could not run (an error in its step) on its output
        queue; finished ones we already know of (from `_pick`)."""
        queue = self._manager.output_router.output_queue
        while not queue.empty():
            output = queue.get_nowait()
            if output.error is None:
                continue
            with self._lock:
                sequence = self._sequences.get(output.request_id)
            if sequence is not None:
                self._fail_run(sequence.run, GenerationFailed(
                    f"generation failed: {str(output.error)[:ERROR_TEXT_CHARS]}"))

    def _fail(self, request: Request, error: EngineError) -> None:
        with self._lock:
            self._held.pop(request, None)
        self.metrics.failed += 1
        emit(request, Failed(error))

    def _fail_all(self, error: EngineError) -> None:
        with self._lock:
            runs = list(self._runs.values())
        for run in runs:
            self._fail_run(run, error)

    def _restart_generation(self) -> bool:
        """The library's generation thread ended (an error step_guard could not contain): fail
        what it held and start it again, up to MAX_LOOP_RESTARTS times. False: give up."""
        fatal = self._manager.background_thread_status.fatal_error
        self._fail_all(GenerationFailed("generation failed: the generation loop stopped: "
                                        f"{str(fatal)[:ERROR_TEXT_CHARS]}"))
        with self._lock:
            if self._stopping or self._restarts >= MAX_LOOP_RESTARTS:
                return False
            self._restarts += 1
        print(f"basestation: the generation loop stopped ({fatal!r}); starting it again "
              f"({self._restarts} of {MAX_LOOP_RESTARTS})", file=sys.stderr, flush=True)
        with torch.inference_mode():  # the generation thread inherits it
            self._manager.start()
        return True

    # --- either thread: a run leaves --------------------------------------------------------------

    def _take_run(self, run: _Run) -> bool:
        """Take a run off the table and stop its sequences still in the library (their KV cache
        freed before the next step). False when it had left already."""
        with self._lock:
            taken = self._runs.pop(run.request.id, None) is not None
            for cb_id in run.live:
                self._sequences.pop(cb_id, None)
                self._manager.cancel_request(cb_id)
            run.live.clear()
            self._lock.notify()
        return taken

    def _fail_run(self, run: _Run, error: EngineError) -> None:
        """Fail one request, whichever of its steps went wrong; the other runs go on. Its only
        last event: a run that finished, failed or was cancelled already is left alone."""
        self._take_run(run)
        with self._lock:
            if run.done:
                return
            run.done = True
        self._fail(run.request, error)

    def _conclude(self, run: _Run, event: Finished | Failed) -> None:
        with self._lock:
            if run.done:
                return
            run.done = True
            self._held.pop(run.request, None)
        emit(run.request, event)

    # --- the generation thread ------------------------------------------------------------------

    def _before_forward(self, module, args, kwargs):
        """Forward pre-hook: a batched step runs inside `runtime.batch` with each token's θ
        and the ledger of its request, left in `_after_forward`. A plain forward (echo
        scoring) is set up by its caller."""
        cu_seq_lens = kwargs.get("cu_seq_lens_q")
        processor = self._manager.batch_processor if self._manager is not None else None
        if cu_seq_lens is None or processor is None:
            return None
        batch = processor.inputs_and_outputs.requests_in_batch
        lengths = [future.query_length for future in batch]
        runtime = self.session.runtime
        input_ids = kwargs.get("input_ids")
        if input_ids is None or sum(lengths) != input_ids.shape[-1]:  # padded: not ours
            self._step.enter_context(runtime.batch(theta=self.defaults.theta))
            return None
        ledgers: list[RequestLedger] = []
        slot: dict[int, int] = {}
        owners, thetas = [], []
        with self._lock:
            for future in batch:
                sequence = self._sequences.get(future.state.request_id)
                ledger = sequence.run.ledger if sequence else runtime.new_ledger()
                owners.append(slot.setdefault(id(ledger), len(ledgers)))
                if owners[-1] == len(ledgers):
                    ledgers.append(ledger)
                thetas.append(self.defaults.theta if sequence is None
                              else sequence.run.request.job.params.theta
                              if sequence.run.pacers is None
                              else sequence.run.pacers[sequence.index].next_theta())
        self.metrics.batch_sequences.observe(len(batch))
        counts = torch.tensor(lengths)
        theta = thetas[0] if len(set(thetas)) == 1 else \
            torch.repeat_interleave(torch.tensor(thetas, dtype=torch.float64), counts)
        mean_theta = sum(t * n for t, n in zip(thetas, lengths)) / max(sum(lengths), 1)
        self.metrics.theta_in_use = mean_theta
        if self.live is not None:
            self.live.step_started(sum(lengths), max(lengths, default=0) > 1, mean_theta)
        self._step.enter_context(runtime.batch(
            theta=theta, ledgers=ledgers,
            owners=torch.repeat_interleave(torch.tensor(owners), counts)))
        return None

    def _after_forward(self, module, args, kwargs, output):
        """Forward hook (run also when the forward raised): the step's batch plan ends."""
        self._step.close()
        if self.live is not None:
            self.live.step_ended()  # a step it was not told of is ignored
        return None

    def _step_failed(self, cb_ids: list[str], error: Exception) -> None:
        """step_guard's callback: a batched step raised and the library failed its sequences
        `cb_ids` (which of them caused it is unknown): fail their requests, once each."""
        try:
            with self._lock:
                runs = {id(s.run): s.run for s in map(self._sequences.get, cb_ids) if s}
            report(error, f"a decoding step of {len(cb_ids)} sequences (requests "
                          f"{', '.join(r.request.id for r in runs.values()) or 'none'})")
            for run in runs.values():
                self._fail_run(run, internal_error(error, "a decoding step it shared raised"))
        except Exception as e:  # the loop goes on; its admission thread fails what is left
            report(e, "failing the requests of a failed step")

    def _pick(self, cb_id: str, logits: torch.Tensor) -> int:
        """BatchSampler's callback: this sequence's next token from its raw logits row [V].
        Whatever goes wrong here fails this sequence's request only."""
        with self._lock:
            sequence = self._sequences.get(cb_id)
        if sequence is None:  # cancelled: the library drops it before the next step
            return greedy(logits)
        try:
            return self._advance(cb_id, sequence, logits)
        except Exception as e:
            report(e, f"decoding request {sequence.run.request.id}")
            self._fail_run(sequence.run, internal_error(e))
            return greedy(logits)

    def _advance(self, cb_id: str, sequence: _Sequence, logits: torch.Tensor) -> int:
        run = sequence.run
        if run.request.cancelled.is_set():  # its front end is gone
            self.cancel(run.request)
            return greedy(logits)
        if run.request.job.params.exact and run.ledger.fault_drops:  # before any altered text
            self._lose(run)
            return greedy(logits)
        token = sequence.sampler.pick(logits)
        now, wait_s = time.perf_counter(), self.session.runtime.stats.network_s
        latencies = run.latencies_ms[sequence.index]
        metrics = self.metrics
        (metrics.decode_latency if latencies else metrics.prefill_latency).observe(
            now - sequence.last_s)
        if run.first_token_s is None:
            run.first_token_s = time.monotonic()
            metrics.time_to_first_token.observe(run.first_token_s - run.request.submitted_s)
        latencies.append((now - sequence.last_s) * 1e3)
        if run.pacers is not None:
            run.pacers[sequence.index].token(latencies[-1])
        run.waits_ms[sequence.index].append((wait_s - sequence.last_wait_s) * 1e3)
        run.slowest[sequence.index].append(self.live.last_slowest() if self.live is not None else None)
        metrics.token_latency.observe(now - sequence.last_s)
        sequence.last_s, sequence.last_wait_s = now, wait_s
        decoder = run.decoders[sequence.index]
        delta, reason = decoder.add(token, logits)
        if delta and run.request.job.stream:
            emit(run.request, Delta(sequence.index, delta))
        if reason is not None:
            with self._lock:
                self._sequences.pop(cb_id, None)
                run.live.discard(cb_id)
                if not (token in decoder.eos_ids or len(decoder.tokens) >= decoder.budget):
                    self._manager.cancel_request(cb_id)  # a stop string: the library goes on
                if not run.live and self._runs.pop(run.request.id, None) is not None:
                    self._finish(run)
                self._lock.notify()
        return token

    def _lose(self, run: _Run) -> None:
        """An exact request lost an expert to a fault: stop its sequences and fail it with
        ExpertLost. The other requests of the batch go on."""
        if self._take_run(run):  # else failed already, from another of its sequences
            self._expert_lost(run)

    def _expert_lost(self, run: _Run) -> None:
        error = lost_error(run.ledger, [a.figures() for a in self.session.agents])
        self.metrics.expert_lost += 1
        self._conclude(run, Failed(error))

    def _finish(self, run: _Run) -> None:
        """All choices done: the Finished event, with this request's own WDMoE figures. Called
        once its sequences left the table: should building the event fail, the request fails
        with it, never left without an answer."""
        try:
            if run.request.job.params.exact and run.ledger.fault_drops:  # lost at the last step
                self._expert_lost(run)
                return
            event = self._finished(run)
        except Exception as e:
            report(e, f"finishing request {run.request.id}")
            self._fail_run(run, internal_error(e))
            return
        self.metrics.prompt_tokens += run.prompt_tokens
        self.metrics.completion_tokens += event.completion_tokens
        self.metrics.completed += 1
        self._conclude(run, event)

    def _finished(self, run: _Run) -> Finished:
        choices = tuple(decoder.choice() for decoder in run.decoders)
        completion_tokens = sum(c.completion_tokens for c in choices)
        ledger = run.ledger
        params = run.request.job.params
        wdmoe = {
            "theta": params.theta if run.pacers is None else mean_theta(run.pacers),
            "token_latency_ms": [round(t, 3) for per in run.latencies_ms for t in per],
            "time_to_first_token_ms": round((run.first_token_s - run.request.submitted_s) * 1e3,
                                            3) if run.first_token_s is not None else None,
            "per_token": per_token(run.latencies_ms, run.waits_ms, run.slowest),
            "expert_calls": ledger.expert_calls,
            "experts_dropped": ledger.experts_dropped,
            "fault_drops": ledger.fault_drops,  # of experts_dropped: lost to a fault, not θ
            "retries": ledger.retries,
            "failed_requests": ledger.failed_requests,
            "agents": ledger_figures(ledger, [a.figures() for a in self.session.agents]),
        }
        if run.pacers is not None:
            wdmoe["latency_target"] = target_report(params.latency_target_ms, run.pacers)
            self.metrics.theta.observe(wdmoe["theta"])
        return Finished(choices=choices, prompt_tokens=run.prompt_tokens,
                        completion_tokens=completion_tokens, wdmoe=wdmoe)


def per_token(latencies_ms: list[list[float]], waits_ms: list[list[float]],
              slowest: list[list[str | None]]) -> dict:
    """A request's tokens (choice after choice, as token_latency_ms), each: its time, the
    base station's own part, the wait on agents and the slowest agent of its step."""
    total = [t for per in latencies_ms for t in per]
    waits = [w for per in waits_ms for w in per]
    return {"total_ms": [round(t, 3) for t in total],
            "base_station_ms": [round(max(t - w, 0.0), 3) for t, w in zip(total, waits)],
            "wait_ms": [round(w, 3) for w in waits],
            "slowest": [s for per in slowest for s in per]}


def internal_error(error: Exception, where: str = "") -> GenerationFailed:
    """For a request that an error in the server failed: the exception's type and text
    (bounded), no traceback (that goes to the log, `report`)."""
    text = f"{type(error).__name__}: {error}"[:ERROR_TEXT_CHARS]
    return GenerationFailed(f"generation failed: {where + ': ' if where else ''}{text}")


def report(error: BaseException, during: str) -> None:
    """One log entry, with its traceback, for an error that failed requests."""
    print(f"basestation: error while {during}; the server goes on", file=sys.stderr)
    traceback.print_exception(error, file=sys.stderr)
    sys.stderr.flush()


def lost_error(ledger: RequestLedger, agents: list[dict]) -> ExpertLost:
    """For an exact request that lost experts: how many slots, on which agents (dicts of
    AgentLink.figures(), in box order)."""
    failed = {a["address"]: ledger.failures[b] for b, a in enumerate(agents)
              if ledger.failures[b]}
    down = [a["address"] for b, a in enumerate(agents) if b in ledger.down or not a["alive"]]
    return ExpertLost("exact: " + lost_message(ledger.fault_drops, failed, down) +
                      "; retry, or send without exact to accept it")


def ledger_figures(ledger: RequestLedger, agents: list[dict]) -> list[dict]:
    """Each agent's estimates now, and this request's calls, drops and failures on it."""
    return [{"address": a["address"], "experts": a["experts"], "alive": a["alive"],
             "calls": ledger.calls[b], "drops": ledger.drops[b],
             "failures": ledger.failures[b], "rtt_ms": a["rtt_ms"],
             "throughput_mbit_s": a["throughput_mbit_s"],
             "compute_us_per_token": a["compute_us_per_token"]}
            for b, a in enumerate(agents)]
