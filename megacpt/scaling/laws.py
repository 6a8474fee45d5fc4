"""Scaling-law forms, their log-sum-exp parameterisation and compute-optimal allocation.

Every law here is fitted in log space as a log-sum-exp (LSE) of terms that are *linear* in
the free parameters theta:

    log L_hat_i = LSE_k( const[k, i] + sum_p J[k, i, p] * theta[p] )

- Chinchilla (from scratch), theta = (a, b, e, alpha, beta):
      L = E + A / N^alpha + B / D^beta,          A = exp(a), B = exp(b), E = exp(e)
      terms: a - alpha log N  |  b - beta log D  |  e
- CPT extension, theta = (b, beta, gamma); E, A, alpha come from a from-scratch fit (`base`):
      L = E + A / N^alpha + B' / (D^beta' N^gamma)
      terms: log A - alpha log N  |  b - beta log D - gamma log N  |  log E
  (B and beta of this law are the paper's B' and beta').
- Loss-compute frontier, theta = (a, g, e) (or (a, g) with `offset=False`):
      L_opt(C) = E' + A' / C^g
      terms: a - g log C  |  e

`Design` holds const and J for one data set; `fit.py` minimises the Huber loss on
LSE - log L with it.  Natural parameter dicts use the keys of the CLI's FIT.json:
"E", "A", "B", "alpha", "beta", "gamma" (and "g" for the frontier).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

LAWS = ("chinchilla", "cpt", "frontier")


@dataclass
class Design:
    """Linear LSE terms of one law on one data set: term[k, i] = const[k, i] + J[k, i] @ theta."""

    const: np.ndarray  # [K, n], or [S, K, n]: one set of constants per start (batched bases)
    J: np.ndarray  # [K, n, P]

    @property
    def n_points(self) -> int:
        return self.const.shape[-1]

    def take(self, idx) -> "Design":
        """The design of starts `idx` (itself unless const is per start)."""
        return self if self.const.ndim == 2 else Design(self.const[idx], self.J)


@dataclass(frozen=True)
class LawSpec:
    """One law: its name, free log-space parameters and the natural parameters they map to."""

    name: str
    free: tuple  # names of the entries of theta, in order
    base: dict | None = None  # inherited natural parameters (CPT: E, A, alpha)
    offset: bool = True  # frontier only: include the E' term

    @property
    def n_params(self) -> int:
        return len(self.free)

    def design(self, N=None, D=None, C=None) -> Design:
        """Build the LSE design for the given data (N, D for the laws; C for the frontier)."""
        if self.name == "frontier":
            logc = np.log(np.asarray(C, dtype=np.float64))  # [n]
            n = logc.size
            K = 2 if self.offset else 1
            const, J = np.zeros((K, n)), np.zeros((K, n, self.n_params))
            J[0, :, 0], J[0, :, 1] = 1.0, -logc
            if self.offset:
                J[1, :, 2] = 1.0
            return Design(const, J)
        logn = np.log(np.asarray(N, dtype=np.float64))  # [n]
        logd = np.log(np.asarray(D, dtype=np.float64))  # [n]
        n = logn.size
        const, J = np.zeros((3, n)), np.zeros((3, n, self.n_params))
        if self.name == "chinchilla":
            J[0, :, 0], J[0, :, 3] = 1.0, -logn
            J[1, :, 1], J[1, :, 4] = 1.0, -logd
            J[2, :, 2] = 1.0
        elif self.name == "cpt":
            base = self.base
            const[0] = math.log(base["A"]) - base["alpha"] * logn
            J[1, :, 0], J[1, :, 1] = 1.0, -logd
            if "gamma" in self.free:
                J[1, :, 2] = -logn
            else:  # gamma held fixed (0: the Chinchilla form with inherited E, A, alpha)
                const[1] = -base["gamma"] * logn
            const[2] = math.log(base["E"])
        else:
            raise ValueError(f"unknown law {self.name!r}; expected one of {LAWS}")
        return Design(const, J)

    def to_natural(self, theta) -> dict:
        """Map one theta vector to the natural parameter dict (including inherited ones)."""
        t = dict(zip(self.free, (float(x) for x in theta)))
        if self.name == "chinchilla":
            return {"E": math.exp(t["e"]), "A": math.exp(t["a"]), "B": math.exp(t["b"]),
                    "alpha": t["alpha"], "beta": t["beta"]}
        if self.name == "cpt":
            return {"E": float(self.base["E"]), "A": float(self.base["A"]),
                    "B": math.exp(t["b"]), "alpha": float(self.base["alpha"]),
                    "beta": t["beta"], "gamma": t.get("gamma", self.base.get("gamma"))}
        out = {"A": math.exp(t["a"]), "g": t["g"]}
        out["E"] = math.exp(t["e"]) if self.offset else 0.0
        return out

    def to_theta(self, params: dict) -> np.ndarray:
        """Inverse of `to_natural` (ignores inherited parameters)."""
        logs = {"a": "A", "b": "B", "e": "E"}
        return np.array([math.log(params[logs[p]]) if p in logs else float(params[p])
                         for p in self.free])


def chinchilla() -> LawSpec:
    return LawSpec("chinchilla", ("a", "b", "e", "alpha", "beta"))


def cpt(base: dict, gamma: float | None = None) -> LawSpec:
    """CPT law inheriting E, A, alpha from a from-scratch fit (a FIT.json dict).

    gamma=None fits gamma; a number holds it fixed (gamma=0 is the Chinchilla form with the
    inherited E, A, alpha: the baseline the paper's Table 3 compares the extension with).
    """
    missing = [k for k in ("E", "A", "alpha") if k not in base]
    if missing:
        raise ValueError(f"base fit lacks {missing}: the CPT law inherits E, A and alpha "
                         "from a from-scratch Chinchilla fit")
    if not (base["E"] > 0 and base["A"] > 0 and np.isfinite(base["alpha"])):
        raise ValueError(f"base fit needs E > 0, A > 0 and a finite alpha, got {base}")
    inherited = {k: float(base[k]) for k in ("E", "A", "alpha")}
    if gamma is None:
        return LawSpec("cpt", ("b", "beta", "gamma"), base=inherited)
    return LawSpec("cpt", ("b", "beta"), base={**inherited, "gamma": float(gamma)})


def frontier(offset: bool = True) -> LawSpec:
    return LawSpec("frontier", ("a", "g", "e") if offset else ("a", "g"), offset=offset)


def make_law(name: str, base: dict | None = None) -> LawSpec:
    """Law by CLI name; `base` (a from-scratch fit) is required for "cpt"."""
    if name == "chinchilla":
        return chinchilla()
    if name == "cpt":
        if base is None:
            raise ValueError("the cpt law needs --base FIT.json (a from-scratch chinchilla fit)")
        return cpt(base)
    if name == "frontier":
        return frontier()
    raise ValueError(f"unknown law {name!r}; expected one of {LAWS}")


def predict(params: dict, N=None, D=None, C=None):
    """Loss predicted by natural parameters: frontier if "g" in params, CPT if "gamma" in it."""
    if "g" in params:
        C = np.asarray(C, dtype=np.float64)
        return params.get("E", 0.0) + params["A"] / C ** params["g"]
    N = np.asarray(N, dtype=np.float64)
    D = np.asarray(D, dtype=np.float64)
    gamma = params.get("gamma", 0.0)
    return (params["E"] + params["A"] / N ** params["alpha"]
            + params["B"] / (D ** params["beta"] * N ** gamma))


def allocation(params: dict, law: str | None = None) -> dict:
    """Compute-optimal allocation under C = 6 N D.

    N_opt = G (C/6)^a and D_opt = G^-1 (C/6)^b, returned with the coefficients in C itself:
    N_opt = N_coef C^a, D_coef C^b (N_coef = G 6^-a, D_coef = G^-1 6^-b).
    Chinchilla: G = (alpha A / (beta B))^(1/(alpha+beta)), a = beta/(alpha+beta).
    CPT: G = (alpha A / ((beta-gamma) B))^(1/(alpha+beta-gamma)), a = beta/(alpha+beta-gamma),
    b = (alpha-gamma)/(alpha+beta-gamma).  `law` defaults to "cpt" iff params has "gamma".
    """
    if law is None:
        law = "cpt" if "gamma" in params else "chinchilla"
    need = ["A", "B", "alpha", "beta"] + (["gamma"] if law == "cpt" else [])
    missing = [k for k in need if k not in params]
    if missing:
        raise ValueError(f"allocation for the {law} law needs {need}; missing {missing}")
    A, B, alpha, beta = (float(params[k]) for k in ("A", "B", "alpha", "beta"))
    gamma = float(params["gamma"]) if law == "cpt" else 0.0
    denom = alpha + beta - gamma
    if not (A > 0 and B > 0 and alpha > 0 and beta - gamma > 0 and denom > 0):
        raise ValueError(f"allocation needs A, B, alpha > 0 and beta - gamma > 0 "
                         f"(a finite optimum); got {params}")
    G = (alpha * A / ((beta - gamma) * B)) ** (1.0 / denom)
    a, b = beta / denom, (alpha - gamma) / denom
    return {"a": a, "b": b, "G": G, "N_coef": G * 6.0 ** -a, "D_coef": 6.0 ** -b / G}


def optimal_allocation(params: dict, C, law: str | None = None):
    """(N_opt, D_opt) arrays for compute budgets C (FLOPs)."""
    al = allocation(params, law)
    C = np.asarray(C, dtype=np.float64)
    return al["N_coef"] * C ** al["a"], al["D_coef"] * C ** al["b"]
