"""`basestation chat`: a REPL over the tokenizer's chat template, tokens streamed as they come.

Commands: /theta X, /temperature X|default, /stats, /devices, /reset, /quit. Ctrl-C stops the
current answer only. With --latency-target-ms each answer picks θ per token to hold its mean
token latency on the target (a fresh controller per answer); /theta X sets θ instead.
"""

from __future__ import annotations

import sys

from basestation.generate import GenerationResult, budget_error, context_length, generate

HELP = ("commands: /theta X  /temperature X|default  /stats  /devices  /reset  /quit   "
        "(Ctrl-C stops an answer)")


def agents_table(agents: list[dict]) -> str:
    rows = [f"{'agent':<26} {'experts':<9} {'alive':<5} {'rtt ms':>8} {'Mbit/s':>9} "
            f"{'us/token':>9} {'calls':>7} {'drops':>6} {'fails':>5}"]
    for a in agents:
        rows.append(f"{a['agent'][:26]:<26} {','.join(map(str, a['experts']))[:9]:<9} "
                    f"{'yes' if a['alive'] else 'NO':<5} {a['rtt_ms']:>8.3f} "
                    f"{a['throughput_mbit_s']:>9.1f} {a['compute_us_per_token']:>9.1f} "
                    f"{a['calls']:>7} {a['drops']:>6} {a['failures']:>5}")
    return "\n".join(rows)


def run_chat(session, args, read=input, write=print) -> int:
    tokenizer = session.base.tokenizer
    context = context_length(session.base.config, tokenizer)
    theta = session.theta  # this conversation's θ; /theta changes it
    target_ms = getattr(args, "latency_target_ms", None)  # in place of θ; /theta ends it
    temperature = args.temperature  # None: the model's sampling defaults; 0: greedy
    messages: list[dict] = []
    totals = {"tokens": 0, "seconds": 0.0, "calls": 0, "dropped": 0, "faults": 0}
    write(f"connected to {len(session.agents)} agents, " + (
        f"latency target {target_ms:g} ms" if target_ms is not None else f"theta {theta:g}")
        + f". {HELP}")
    while True:
        try:
            line = read("you> ").strip()
        except EOFError:
            write("")
            return 0
        except KeyboardInterrupt:
            write("")
            continue
        if not line:
            continue
        if line.startswith("/"):
            command, _, value = line.partition(" ")
            if command == "/quit":
                return 0
            if command == "/theta":
                try:
                    new_theta = float(value)
                    if not 0.0 <= new_theta <= 1.0:
                        raise ValueError
                except ValueError:
                    write("usage: /theta X with 0 <= X <= 1")
                    continue
                theta, target_ms = new_theta, None
                write(f"theta = {theta:g}")
            elif command == "/temperature":
                try:
                    temperature = None if value.strip() == "default" else float(value)
                    if temperature is not None and not 0.0 <= temperature <= 10.0:
                        raise ValueError
                except ValueError:
                    write("usage: /temperature X with 0 <= X <= 10 (0: greedy), or default")
                    continue
                write("temperature = " + ("the model's default" if temperature is None
                                          else f"{temperature:g}"))
            elif command == "/reset":
                messages.clear()
                write("conversation cleared")
            elif command in ("/stats", "/devices"):
                session.poll_probes(0.05)
                write(agents_table([a.figures() for a in session.agents]))
                if command == "/stats":
                    considered = totals["calls"] + totals["dropped"]
                    rate = totals["tokens"] / totals["seconds"] if totals["seconds"] else 0.0
                    drop = 100 * totals["dropped"] / considered if considered else 0.0
                    write(f"session: {totals['tokens']} tokens, {rate:.1f} tokens/s, "
                          f"drop rate {drop:.1f} %, lost to faults {totals['faults']}, "
                          f"theta {theta:g}")
            else:
                write(HELP)
            continue
        messages.append({"role": "user", "content": line})
        input_ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                                  return_tensors="pt", return_dict=True)["input_ids"]
        problem = budget_error(input_ids.shape[1], args.max_new_tokens, context)
        if problem:  # the conversation outgrew the context: say so, keep the session
            messages.pop()
            write(f"{problem}; /reset starts a new conversation")
            continue
        sys.stdout.write("bot> ")
        sys.stdout.flush()
        result: GenerationResult = generate(
            session, input_ids, args.max_new_tokens, temperature, args.ignore_eos,
            on_text=lambda piece: (sys.stdout.write(piece), sys.stdout.flush()), theta=theta,
            latency_target_ms=target_ms)
        write("")
        write(result.summary())
        messages.append({"role": "assistant", "content": result.text})
        totals["tokens"] += len(result.token_ids)
        totals["seconds"] += sum(result.token_latency_ms) / 1e3
        totals["calls"] += result.expert_calls
        totals["dropped"] += result.experts_dropped
        totals["faults"] += result.fault_drops
