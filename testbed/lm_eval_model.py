"""lm-evaluation-harness over the distributed model: any lm-eval task through real agents.

`DistributedLM` is lm-eval's own HuggingFace model class (`HFLM`, its extension point for a
ready transformers model) given the base station's model: the family's transformers class
whose routed experts run on the agents. So loglikelihood, rolling loglikelihood and
generate_until are lm-eval's code, batched as lm-eval batches (`batch_size` items per forward
pass, hence one request per agent per layer for the whole batch), and each MoE layer drops
experts at this model's θ.

lm-eval is an optional extra (`pip install -e '.[eval]'`; `make install` has it): import this
module only where evaluation runs.
"""

from __future__ import annotations

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
        """`--model wdmoe --model_args shards=DIR,agents=ROSTER[,theta=0.2,batch_size=8]`
        for scripts that call lm-eval's `simple_evaluate` by model name."""
        from basestation.session import build_roster, open_session
        from lm_eval.utils import simple_parse_args_string

        args = simple_parse_args_string(arg_string)
        session = open_session(args["shards"], build_roster([], args["agents"], None),
                               dtype=str(args.get("dtype", "auto")), progress=False)
        return cls(session, theta=float(args.get("theta", 0.0)),
                   batch_size=int(args.get("batch_size", 8)))

    def _model_call(self, inps: torch.Tensor, attn_mask=None, labels=None) -> torch.Tensor:
        self.session.runtime.theta = self.theta
        self.session.runtime.charge_to(None)
        return super()._model_call(inps, attn_mask, labels)

    def _model_generate(self, context, max_length: int, stop: list[str], **kwargs):
        self.session.runtime.theta = self.theta
        self.session.runtime.charge_to(None)
        return super()._model_generate(context, max_length, stop, **kwargs)
