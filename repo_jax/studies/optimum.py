"""The iREPO optimum in small: a tabular policy trained with the project's own parts.

ALGORITHMS.md: with Bradley-Terry annotators ``p_ij = sigma(r_i - r_j)``, every pair and unlimited
votes, minimising L_iREPO over a finite response set gives ``pi(y) ∝ pi_ref(y) exp(r(y) / beta)``.
The policy here is one logit per response (P prompts x K responses), ``log pi = log_softmax(theta)``,
``rho = log pi - log pi_ref``, trained from ``pi_ref`` on all ``C(K, 2)`` pairs with the loss kernels
of :mod:`repo_jax.losses`, the Zermelo fit of :mod:`repo_jax.preferences` and the optimiser of
:mod:`repo_jax.training.optim` (AdamW, warm-up + cosine), in one jitted ``lax.scan``. Experiments:

  exact    unlimited votes: ``TV(pi, pi*)`` per prompt
  votes    A finite annotators, ``p_hat`` from Zermelo (pseudo-count 0.5): the gap to ``pi*`` vs A
  rounds   ``pi_ref <- pi_t`` with exact p: ``pi_t ∝ pi_0 exp(t r / beta)``
  methods  soft DPO (same soft labels), DPO and IPO (hard labels) beside iREPO

``python -m repo_jax.studies.optimum --out docs/optimum.png`` prints the tables and writes the plot
and a JSON of the numbers beside it.

Dimension letters: P prompts, K responses, M = K(K-1)/2 pairs, A annotators, S optimiser steps.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

from repo_jax import losses, preferences
from repo_jax.training import optim
from repo_jax.training.config import LossConfig, OptimConfig

PSEUDO_COUNT = 0.5  # the loop's default (repo_jax.loop.config.AnnotateConfig)


@dataclasses.dataclass(frozen=True)
class Setup:
    prompts: int = 8
    responses: int = 6
    seed: int = 0
    loss: LossConfig = LossConfig(beta=0.5)  # pref_eps 1e-3 as shipped
    optim: OptimConfig = OptimConfig(lr=0.05, warmup_steps=10, total_steps=2000, weight_decay=0.0)


def problem(s: Setup):
    """Rewards ``r ~ N(0, 1)`` and a reference ``pi_ref = softmax(N(0, 1))``, per prompt."""
    kr, kq = jax.random.split(jax.random.key(s.seed))
    r_PxK = jax.random.normal(kr, (s.prompts, s.responses))
    return r_PxK, jax.nn.log_softmax(jax.random.normal(kq, (s.prompts, s.responses)))


def target(logp_ref_PxK, r_PxK, beta):
    """``log pi*`` with ``pi* ∝ pi_ref exp(r / beta)``."""
    return jax.nn.log_softmax(logp_ref_PxK + r_PxK / beta, axis=-1)


def tv(logp_a, logp_b):  # total variation per prompt, [P]
    return 0.5 * jnp.abs(jnp.exp(logp_a) - jnp.exp(logp_b)).sum(-1)


def kl(logp_a, logp_b):  # KL(a || b) per prompt, [P]
    return (jnp.exp(logp_a) * (logp_a - logp_b)).sum(-1)


def mass_on(logp_PxK, idx_P):
    return jnp.exp(jnp.take_along_axis(logp_PxK, idx_P[:, None], -1)[:, 0])


def pairs(k):
    return jnp.triu_indices(k, 1)  # i_M < j_M


def exact_prefs(r_PxK):
    """``p_ij = sigma(r_i - r_j)`` on every pair ``i < j``: unlimited Bradley-Terry votes."""
    i_M, j_M = pairs(r_PxK.shape[-1])
    return preferences.bt_matrix(r_PxK)[:, i_M, j_M]


@functools.partial(jax.jit, static_argnames="annotators")
def vote_counts(key, r_PxK, annotators):
    """``counts[p, i, j]``: of ``A`` annotators voting ``Bernoulli(sigma(r_i - r_j))`` on each pair."""
    p, k = r_PxK.shape
    i_M, j_M = pairs(k)
    v_AxPxM = jax.random.bernoulli(key, exact_prefs(r_PxK), (annotators, p, i_M.size)).astype(jnp.float32)
    probs_AxPxKxK = jnp.zeros((annotators, p, k, k)).at[:, :, i_M, j_M].set(v_AxPxM).at[:, :, j_M, i_M].set(1 - v_AxPxM)
    return preferences.counts_from_probs(probs_AxPxKxK)


@jax.jit
def zermelo_prefs(counts_PxKxK):
    """``p_hat`` on every pair from the Zermelo strengths (pseudo-count 0.5), and ``log w``."""
    w_PxK = preferences.zermelo(counts_PxKxK, pseudo_count=PSEUDO_COUNT)
    return preferences.select_pairs(w_PxK, "all_pairs")[2], jnp.log(w_PxK)


def _hard(kernel):
    """A chosen/rejected loss on labels ``pref`` in {0, 1} (1: ``a`` wins)."""
    return lambda a, b, pref, c: kernel(jnp.where(pref > 0.5, a, b), jnp.where(pref > 0.5, b, a), beta=c.beta)


METHODS = {  # (rho_a, rho_b, pref, LossConfig) -> [P, M]
    "irepo": lambda a, b, pref, c: losses.irepo_loss(a, b, pref, beta=c.beta, pref_eps=c.pref_eps),
    "soft_dpo": lambda a, b, pref, c: losses.soft_dpo_loss(a, b, pref, beta=c.beta),
    "dpo": _hard(losses.dpo_loss),
    "ipo": _hard(losses.ipo_loss),
}


@functools.partial(jax.jit, static_argnames=("method", "loss_cfg", "optim_cfg"))
def train(logp_ref_PxK, pref_PxM, logp_star_PxK, *, method, loss_cfg, optim_cfg):
    """``optim_cfg.total_steps`` AdamW steps from ``theta = log pi_ref`` on the mean pair loss.

    Returns the final ``log pi``, the mean ``TV(pi, pi*)`` after every step ``[S]`` and the
    gradient's global norm at the end (0 at a stationary point)."""
    i_M, j_M = pairs(logp_ref_PxK.shape[-1])
    opt = optim.make_optimizer(optim_cfg)

    def loss(theta_PxK):
        rho_PxK = jax.nn.log_softmax(theta_PxK, axis=-1) - logp_ref_PxK
        return METHODS[method](rho_PxK[:, i_M], rho_PxK[:, j_M], pref_PxM, loss_cfg).mean()

    def step(carry, _):
        theta, state = carry
        updates, state = opt.update(jax.grad(loss)(theta), state, theta)
        theta = optax.apply_updates(theta, updates)
        return (theta, state), tv(jax.nn.log_softmax(theta, axis=-1), logp_star_PxK).mean()

    (theta, _), tv_S = jax.lax.scan(step, (logp_ref_PxK, opt.init(logp_ref_PxK)), length=optim_cfg.total_steps)
    return jax.nn.log_softmax(theta, axis=-1), tv_S, optax.tree.norm(jax.grad(loss)(theta))


def fit(s: Setup, logp_ref, pref, logp_star, method="irepo", steps=None):
    o = s.optim if steps is None else dataclasses.replace(s.optim, total_steps=steps)
    return train(logp_ref, pref, logp_star, method=method, loss_cfg=s.loss, optim_cfg=o)


def exact(s: Setup) -> dict:
    r, ref = problem(s)
    star = target(ref, r, s.loss.beta)
    logp, tv_S, gnorm = fit(s, ref, exact_prefs(r), star)
    per = np.asarray(tv(logp, star))
    wrong = np.asarray(tv(logp, target(ref, r, 1.0)))  # what beta = 1 (beta ignored) would predict
    return {"tv_per_prompt": per.tolist(), "tv_max": float(per.max()), "tv_mean": float(per.mean()),
            "tv_vs_beta1_target_mean": float(wrong.mean()), "grad_norm_end": float(gnorm)}


def votes(s: Setup, annotators=(1, 3, 9, 27, 81), seeds=3) -> dict:
    r, ref = problem(s)
    star = target(ref, r, s.loss.beta)
    rows = []
    for a in annotators:
        for seed in range(seeds):
            counts = vote_counts(jax.random.fold_in(jax.random.key(1000 + seed), a), r, a)
            p_hat, log_w = zermelo_prefs(counts)
            logp, _, _ = fit(s, ref, p_hat, star)
            closed = target(ref, log_w, s.loss.beta)  # pi_ref w^(1/beta): the optimum for p_hat
            rows.append({"A": a, "seed": seed, "tv": float(tv(logp, star).mean()), "kl": float(kl(logp, star).mean()),
                         "opt_err": float(tv(logp, closed).max())})
    mean = [np.mean([x["tv"] for x in rows if x["A"] == a]) for a in annotators]
    slope, icpt = np.polyfit(np.log(annotators), np.log(mean), 1)
    hi = [a for a in annotators if a >= 9]  # the large-A end, where the pseudo-count's bias is small
    slope_hi = np.polyfit(np.log(hi), np.log(mean[-len(hi):]), 1)[0] if len(hi) > 1 else np.nan
    return {"annotators": list(annotators), "seeds": seeds, "rows": rows, "tv_mean": [float(m) for m in mean],
            "slope": float(slope), "intercept": float(icpt), "slope_A_ge_9": float(slope_hi)}


def rounds(s: Setup, t_max=5) -> dict:
    r, logp0 = problem(s)
    p, logp, out = exact_prefs(r), logp0, []
    for t in range(1, t_max + 1):
        star_t = target(logp0, t * r, s.loss.beta)
        logp, _, _ = fit(s, logp, p, target(logp, r, s.loss.beta))  # pi_ref <- pi_{t-1}
        out.append({"t": t, "tv_max": float(tv(logp, star_t).max()), "tv_mean": float(tv(logp, star_t).mean()),
                    "top_mass": float(mass_on(logp, jnp.argmax(r, -1)).mean())})
    return {"rounds": out}


def methods(s: Setup, annotators=9, long=(1, 2, 4)) -> dict:
    """Every method on exact p (DPO/IPO labels oriented by p > 1/2), then on A-annotator votes."""
    r, ref = problem(s)
    star = target(ref, r, s.loss.beta)
    top = jnp.argmax(r, -1)
    exact_p, out = exact_prefs(r), {"curves": {}, "final": []}

    def row(name, data, logp, tv_S, gnorm, steps):
        settled = lambda x: None if tv_S[-1] >= x else int(np.nonzero(tv_S >= x)[0].max(initial=-1)) + 2
        top2_PxK = jnp.sort(logp, -1)[:, -2:]
        return {"method": name, "data": data, "steps": steps, "tv": float(tv(logp, star).mean()),
                "entropy": float(-kl(logp, 0.0).mean()), "top_mass": float(mass_on(logp, top).mean()),
                "max_mass": float(jnp.exp(top2_PxK[:, 1]).mean()), "log_odds_1st_2nd": float((top2_PxK[:, 1] - top2_PxK[:, 0]).mean()),
                "grad_norm_end": float(gnorm), "settled_1e-2": settled(1e-2), "settled_1e-4": settled(1e-4)}

    for name in METHODS:
        for k in long if name == "dpo" else (1,):
            steps = k * s.optim.total_steps
            logp, tv_S, gnorm = fit(s, ref, exact_p, star, name, steps)
            tv_S = np.asarray(tv_S)
            out["final"].append(row(name, "exact p", logp, tv_S, gnorm, steps))
            if k == 1:
                out["curves"][name] = tv_S.tolist()
    counts, (i_M, j_M) = vote_counts(jax.random.key(2000), r, annotators), pairs(s.responses)
    p_hat, _ = zermelo_prefs(counts)
    major = (counts[:, i_M, j_M] > counts[:, j_M, i_M]).astype(jnp.float32)  # majority vote; odd A: no ties
    fits = {m: fit(s, ref, lab, star, m) for m, lab in (("irepo", p_hat), ("soft_dpo", p_hat), ("dpo", major))}
    for m, (logp, tv_S, gnorm) in fits.items():
        out["final"].append(row(m, f"A={annotators} votes", logp, np.asarray(tv_S), gnorm, s.optim.total_steps))
    out["soft_dpo_vs_irepo_tv_A"] = float(tv(fits["soft_dpo"][0], fits["irepo"][0]).max())
    out["pi_star"] = {"entropy": float(-kl(star, 0.0).mean()), "top_mass": float(mass_on(star, top).mean())}
    return out


def table(rows, cols) -> str:
    """Fixed-width text: one column per ``cols`` key, formatted by its spec (``None`` as is)."""
    cell = lambda x, f: str(x) if x is None else format(x, f)
    width = {k: max(9, len(k)) for k in cols}
    return "\n".join(["\n" + " ".join(f"{k:>{width[k]}}" for k in cols)]
                     + [" ".join(f"{cell(x[k], f):>{width[k]}}" for k, f in cols.items()) for x in rows])


def plot(res: dict, path: Path) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(15, 4.2))
    ax1, ax2, ax3 = fig.subplots(1, 3)
    v = res["votes"]
    a = np.array(v["annotators"], float)
    per = np.array([[x["tv"] for x in v["rows"] if x["A"] == n] for n in v["annotators"]])
    ax1.errorbar(a, per.mean(1), yerr=[per.mean(1) - per.min(1), per.max(1) - per.mean(1)], fmt="o-",
                 capsize=3, label=f"iREPO on Zermelo p_hat (mean, min-max of {v['seeds']} seeds)")
    ax1.plot(a, np.exp(v["intercept"]) * a ** v["slope"], "--", label=f"fit: slope {v['slope']:.2f}")
    ax1.plot(a, per.mean(1)[-1] * (a / a[-1]) ** -0.5, ":", c="gray", label="slope -1/2 reference")
    ax1.set(xscale="log", yscale="log", xlabel="annotators A (votes per pair)", ylabel="mean TV(pi, pi*)",
            title="gap to pi_ref exp(r/beta) vs annotators")
    for name, curve in res["methods"]["curves"].items():
        ax2.plot(np.arange(1, len(curve) + 1), curve, label=name)
    ax2.set(yscale="log", xlabel="AdamW step (cosine schedule)", ylabel="mean TV(pi, pi*)",
            title="exact p: TV to pi* over training")
    rr = res["rounds"]["rounds"]
    ax3.semilogy([x["t"] for x in rr], [x["tv_max"] for x in rr], "o-", label="max over prompts")
    ax3.semilogy([x["t"] for x in rr], [x["tv_mean"] for x in rr], "s--", label="mean")
    ax3.set_xticks([x["t"] for x in rr])
    ax3.set(xlabel="round t (pi_ref <- pi_t)", ylabel="TV(pi_t, pi_0 exp(t r/beta))", title="iterated rounds, exact p")
    for ax in (ax1, ax2, ax3):
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=100)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="optimum.png", help="the plot; the numbers go to the same name .json")
    ap.add_argument("--seeds", type=int, default=3, help="vote seeds per annotator count")
    args = ap.parse_args(argv)
    s, t0 = Setup(), time.time()
    res = {"setup": dataclasses.asdict(s), "exact": exact(s), "votes": votes(s, seeds=args.seeds),
           "rounds": rounds(s), "methods": methods(s)}
    res["seconds"] = time.time() - t0
    e, v, m = res["exact"], res["votes"], res["methods"]
    print(f"exact p: TV(pi, pi*) max {e['tv_max']:.2e} mean {e['tv_mean']:.2e} "
          f"(vs the beta=1 target: {e['tv_vs_beta1_target_mean']:.3f}); per prompt "
          + " ".join(f"{x:.1e}" for x in e["tv_per_prompt"]))
    print(table(v["rows"], {"A": "d", "seed": "d", "tv": ".4f", "kl": ".5f", "opt_err": ".1e"}))
    print("mean TV per A: " + "  ".join(f"{a}: {x:.4f}" for a, x in zip(v["annotators"], v["tv_mean"]))
          + f"\nlog-log slope {v['slope']:.3f} (A >= 9: {v['slope_A_ge_9']:.3f})")
    print(table(res["rounds"]["rounds"], {"t": "d", "tv_max": ".1e", "tv_mean": ".1e", "top_mass": ".3f"}))
    print(f"pi*: entropy {m['pi_star']['entropy']:.3f}, mass on argmax r {m['pi_star']['top_mass']:.3f}")
    print(table(m["final"], {"method": "", "data": "", "steps": "d", "tv": ".4f", "entropy": ".2g", "top_mass": ".3f",
                             "max_mass": ".3f", "log_odds_1st_2nd": ".2f", "grad_norm_end": ".1e",
                             "settled_1e-2": "", "settled_1e-4": ""}))
    print(f"soft DPO vs iREPO on the same p_hat: max TV {m['soft_dpo_vs_irepo_tv_A']:.1e}\n{res['seconds']:.1f} s")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    plot(res, out)
    kept = {k: x for k, x in m.items() if k != "curves"} | {"curves_every_10": {k: c[9::10] for k, c in m["curves"].items()}}
    out.with_suffix(".json").write_text(json.dumps(res | {"methods": kept}, indent=1))  # curves thinned: a small file
    print(f"plot: {out}   numbers: {out.with_suffix('.json')}")
    return res


if __name__ == "__main__":
    main()
