"""lm-evaluation-harness over the distributed model: any lm-eval task through real agents.

`DistributedLM` is lm-eval's own HuggingFace model class (`HFLM`, its extension point for a
ready transformers model) given the base station's model: the family's transformers class
whose routed experts run on the agents. So loglikelihood, rolling loglikelihood and
generate_until are lm-eval's code, batched as lm-eval batches (`batch_size` items per forward
pass, hence one request per agent per layer for the whole batch), and each MoE layer drops
experts at this model's θ.

lm-eval is an optional extra (`pip install -e '.[eval]'`; `make install` has it): import this
module only where evaluation runs. Importing it registers the model name `wdmoe`; lm-eval's
own command line imports only its own models, so `python -m testbed.experiments.lm_eval_cli` registers it
first and then runs that command line unchanged.
"""

from __future__ import annotations

import atexit

import torch
from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM


@register_model("wdmoe")
class DistributedLM(HFLM):
    """lm-eval's HFLM over an open base-station session, at one θ (change it with `theta`)."""

    def __init__(self, session, theta: float = 0.0, batch_size: int = 8,
                 max_length: int | None = None):
        self.session = session
        self.theta = theta
        super().__init__(pretrained=session.base.model, tokenizer=session.base.tokenizer,
                         batch_size=batch_size, max_length=max_length)

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None):
        """`model="wdmoe", model_args="shards=DIR,agents=ROSTER[,theta=0.2,...]"` for scripts
        that call lm-eval's `simple_evaluate` by model name (see from_model_args)."""
        from lm_eval.utils import simple_parse_args_string

        return cls.from_model_args(simple_parse_args_string(arg_string), additional_config)

    @classmethod
    def create_from_arg_obj(cls, arg_dict: dict, additional_config: dict | None = None):
        """lm-eval's command line passes `--model_args` as a dict (see from_model_args)."""
        return cls.from_model_args(dict(arg_dict), additional_config)

    @classmethod
    def from_model_args(cls, args: dict, additional_config: dict | None = None):
        """A session on the agents of a roster: shards=DIR, agents=ROSTER.toml (required);
        theta (0), dtype (auto), wait_s (60: for the agents' INFO), batch_size (lm-eval's
        --batch_size, else 8). The session closes when the process exits. Raises ValueError
        for missing arguments, RosterError or ShardError from the base station."""
        from basestation.session import build_roster, open_session

        missing = [k for k in ("shards", "agents") if not args.get(k)]
        if missing:
            raise ValueError(f"--model wdmoe needs --model_args shards=DIR,agents=ROSTER.toml "
                             f"(missing: {', '.join(missing)})")
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None}
        batch_size = args.get("batch_size", extra.get("batch_size", 8))
        session = open_session(str(args["shards"]), build_roster([], str(args["agents"]), None),
                               dtype=str(args.get("dtype", "auto")),
                               wait_s=float(args.get("wait_s", 60)), progress=False)
        atexit.register(session.close)  # lm-eval never closes a model it made by name
        return cls(session, theta=float(args.get("theta", 0.0)),
                   batch_size=int(batch_size) if str(batch_size).isdigit() else batch_size)

    def _model_call(self, inps: torch.Tensor, attn_mask=None, labels=None) -> torch.Tensor:
        with self.session.runtime.batch(theta=self.theta):
            return super()._model_call(inps, attn_mask, labels)

    def _model_generate(self, context, max_length: int, stop: list[str], **kwargs):
        with self.session.runtime.batch(theta=self.theta):
            return super()._model_generate(context, max_length, stop, **kwargs)
