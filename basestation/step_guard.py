"""A failed step of transformers' continuous batching fails its requests, not the loop.

In transformers 5.x an exception anywhere in a step (the batched forward, our logits
processor, the batch update) reaches `_run_generation_loop`, which fails every request and
ends the generation thread: one bad request stopped the server. `guard_steps` wraps the
manager's loop body so that a step that raises fails only what it was working on, with the
library's own clean-up, and the loop goes on:
- raised once the batch was scheduled (in the forward or the update): the requests of that
  batch (`handle_batch_error`: their KV cache freed, a FAILED output each);
- raised while scheduling (which requests it concerns is unknown): every request the library
  holds (`fail_all_requests`), the KV cache and the scheduler left empty.
Only for synchronous batching (the engine's `use_async_batching=False`): the async loop has a
second batch in flight whose state this does not know.
"""

from __future__ import annotations

from typing import Callable


def guard_steps(manager, on_failure: Callable[[list[str], Exception], None]) -> None:
    """Wrap `manager`'s loop body (before its start): a step that raises calls
    `on_failure(request ids it failed, the exception)` on the generation thread and the loop
    goes on. Should the clean-up itself raise, that reaches the library as before (the loop
    ends; the caller sees `manager.is_running()` false). The names wrapped are the library's
    private ones: an upgrade that renames them fails here, at start, not silently."""
    body, step = manager._generation_loop_body, manager._generation_step
    stepping = [False]  # the current batch was scheduled and handed to the forward

    def guarded_step() -> None:
        stepping[0] = True
        step()

    def guarded_body(processor, bootstrapping: bool) -> bool:
        stepping[0] = False
        try:
            return body(processor, bootstrapping)
        except Exception as error:
            ids = step_request_ids(processor, stepping[0])
            # ours first: the library's clean-up puts a FAILED output per request on its
            # queue, which the engine's admission thread may read before on_failure runs and
            # fail the request without saying a shared step raised
            on_failure(ids, error)
            fail_step(processor, error, stepping[0])
            return True

    manager._generation_step = guarded_step
    manager._generation_loop_body = guarded_body


def step_request_ids(processor, scheduled: bool) -> list[str]:
    """The ids of the requests a failed step concerns (see the module's docstring)."""
    if scheduled:
        return [future.state.request_id
                for future in processor.inputs_and_outputs.requests_in_batch]
    scheduler = processor.scheduler
    return [*scheduler.active_requests, *scheduler.waiting_requests]


def fail_step(processor, error: Exception, scheduled: bool) -> None:
    """Fail, in the library, the requests a failed step concerns (step_request_ids)."""
    if scheduled:
        processor.handle_batch_error(error)
    else:
        processor.fail_all_requests(error)
    # their KV cache is free again: as when a request finishes (update_batch), waiting ones may
    # be scheduled, though offloading had blocked them for want of room
    processor.scheduler.block_new_requests = False
