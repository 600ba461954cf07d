"""Small builders shared by the trainer tests: a DiT train state and the flow-matching objective."""
from lens_jax.diffusion.flow_matching import flow_matching_objective
from lens_jax.models.mmdit import dummy_inputs
from lens_jax.train import sharding as sharding_lib
from lens_jax.train.state import Net, TrainSpec

MU_RULE = dict(mu_lo=1.0, mu_hi=1.3, n_lo=256, n_hi=4096)


def dit_spec(model, optimizer, schedule=None, ema_decay=0.0, rules=sharding_lib.DEFAULT_RULES, dummy=None, seed=0,
             policy=(), load=None):
    dummy = dummy or dummy_inputs(model.config)
    return TrainSpec([Net("dit", init=lambda k: model.init(k, **dummy)["params"], rules=rules, optimizer=optimizer,
                          schedule=schedule, ema_decay=ema_decay, policy=policy, load=load)], seed=seed)


def fm_objective(model, caption_dropout=0.1, mu=-1.0, rules=None, **kw):
    return flow_matching_objective(model, mu=mu, mu_rule=MU_RULE, sigma_std=1.0, caption_dropout=caption_dropout,
                                   rules=rules, **kw)
