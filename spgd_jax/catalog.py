"""What the registered samplers and tasks are, as plain data: the command line reads it before it imports JAX.

SAMPLERS is spgd_jax.samplers.describe() and TASKS each task's linearity (spgd_jax.operators) for the
built-in methods and tasks; tests/test_cli_arguments.py checks both against the live registries (rewrite
them from its message when a method or task changes). `samplers()` and `tasks()` answer from the live
registries once spgd_jax.samplers is imported (so a method registered in this process counts too), else
from these tables. This module imports nothing.
"""

from __future__ import annotations

import sys

__all__ = ["SAMPLERS", "TASKS", "samplers", "tasks"]

SAMPLERS = {
    "spgd": {"config": "SPGDConfig", "step_size": "lr", "hint": "a smaller {lr}",
             "conditional": True, "linear_only": False,
             "fields": {"lr": "float", "steps": "int", "warmup": "int", "beta": "float", "lr_min_ratio": "float",
                        "sigma_max": "float", "sigma_min": "float", "rho": "float", "adm": "str",
                        "trajectory_every": "int", "diagnostics": "bool"}},
    "dps": {"config": "DPSConfig", "step_size": "zeta", "hint": "a smaller {zeta}",
            "conditional": True, "linear_only": False,
            "fields": {"zeta": "float", "schedule": "str", "steps": "int", "sigma_max": "float",
                       "sigma_min": "float", "rho": "float", "trajectory_every": "int"}},
    "mcg": {"config": "MCGConfig", "step_size": "alpha", "hint": "a smaller {alpha}",
            "conditional": True, "linear_only": True,
            "fields": {"alpha": "float", "steps": "int", "cg_iterations": "int", "trajectory_every": "int"}},
    "score_sde": {"config": "ScoreSDEConfig", "step_size": None, "hint": "more {steps}",
                  "conditional": True, "linear_only": True,
                  "fields": {"steps": "int", "cg_iterations": "int", "trajectory_every": "int"}},
    "dpps": {"config": "DPPSConfig", "step_size": "zeta", "hint": "a smaller {zeta}",
             "conditional": True, "linear_only": False,
             "fields": {"zeta": "float", "candidates": "int", "steps": "int", "aligned_init": "bool",
                        "trajectory_every": "int"}},
    "ddrm": {"config": "DDRMConfig", "step_size": None, "hint": "more {steps}",
             "conditional": True, "linear_only": True,
             "fields": {"steps": "int", "eta": "float", "eta_b": "float", "sigma_y": "float",
                        "singular_floor": "float", "trajectory_every": "int"}},
    "diffpir": {"config": "DiffPIRConfig", "step_size": "lam", "hint": "a smaller {lam}",
                "conditional": True, "linear_only": True,
                "fields": {"lam": "float", "zeta": "float", "steps": "int", "sigma_y": "float",
                           "cg_iterations": "int", "trajectory_every": "int"}},
    "pnp_admm": {"config": "PnPADMMConfig", "step_size": "penalty", "hint": "a smaller {penalty}",
                 "conditional": True, "linear_only": True,
                 "fields": {"penalty": "float", "sigma_d": "float", "iterations": "int", "cg_iterations": "int",
                            "trajectory_every": "int"}},
    "red_diff": {"config": "RedDiffConfig", "step_size": "lr", "hint": "a smaller {lr}",
                 "conditional": True, "linear_only": True,
                 "fields": {"lr": "float", "lam": "float", "steps": "int", "init_iterations": "int",
                            "trajectory_every": "int"}},
    "daps": {"config": "DAPSConfig", "step_size": "lr", "hint": "a smaller {lr}",
             "conditional": True, "linear_only": False,
             "fields": {"lr": "float", "steps": "int", "ode_steps": "int", "langevin_steps": "int", "tau": "float",
                        "lr_min_ratio": "float", "sigma_max": "float", "sigma_min": "float", "rho": "float",
                        "ode_sigma_min": "float", "trajectory_every": "int"}},
    "euler": {"config": "EulerConfig", "step_size": None, "hint": "more {steps}",
              "conditional": False, "linear_only": False,
              "fields": {"steps": "int", "sigma_max": "float", "sigma_min": "float", "rho": "float",
                         "trajectory_every": "int"}},
}

TASKS = {"sr4": {"linear": True}, "inpaint": {"linear": True}, "inpaint_box": {"linear": True},
         "gauss_deblur": {"linear": True}, "motion_deblur": {"linear": True}, "phase_retrieval": {"linear": False},
         "hdr": {"linear": False}}


def samplers() -> dict:
    """{name: description} of the registered samplers (spgd_jax.samplers.describe())."""
    live = sys.modules.get("spgd_jax.samplers")
    return SAMPLERS if live is None else live.describe()


def tasks() -> dict:
    """{name: {"linear": bool}} of the registered tasks."""
    live = sys.modules.get("spgd_jax.operators")
    if live is None or "spgd_jax.samplers" not in sys.modules:
        return TASKS
    return {name: {"linear": live.get(name, 64).linear} for name in live.TASKS}
