"""Wrote tests/data/ledger_main.json with the code of bde7491 (before the Event type of issue 16a). Kept to show
how the fixture was made; rerunning it with newer code writes a new fixture, which is not the point of the test."""
import json, os, tempfile, logging
logging.getLogger("absl").setLevel(logging.ERROR)
from jaxdp.ledger import Ledger
d = tempfile.mkdtemp()
led = Ledger.init(os.path.join(d, "l.db"))
led.register_dataset("mnist", 20.0, 1e-5, "prv")
led.register_dataset("cifar", 30.0, 1e-5, "rdp", neighboring_relation="replace_one")
led.register_dataset("text", 50.0, 1e-6, "pld")
led.register_dataset("rdp_ar", 40.0, 1e-5, "rdp")
P = dict(model="m", config_hash="abc", code_version="test")
led.reserve("mnist", "r1", [{"sampling": "poisson", "noise_multiplier": 1.1, "sample_rate": 0.004, "steps": 500,
                             "l2_clip_norm": 1.0}], **P)
led.commit("r1", [{"sampling": "poisson", "noise_multiplier": 1.1, "sample_rate": 0.004, "steps": 480,
                   "l2_clip_norm": 1.0}])
led.reserve("mnist", "r2", [{"sampling": "cyclic_poisson", "mechanism": "bandmf", "bands": 4,
                             "noise_multiplier": 2.0, "sample_rate": 0.02, "steps": 103}], **P)
led.commit("r2")
led.reserve("mnist", "r3", [{"sampling": "cyclic_poisson", "mechanism": "dpsgd", "bands": 4,
                             "noise_multiplier": 2.0, "sample_rate": 0.02, "steps": 57}], **P)  # left open
led.reserve("mnist", "r4", {"sampling": "poisson", "noise_multiplier": 3.0, "sample_rate": 0.01, "steps": 10.0}, **P)
led.release("r4", "never started")
led.reserve("text", "r5", [{"sampling": "truncated_poisson", "noise_multiplier": 1.5, "sample_rate": 0.01,
                            "max_batch_size": 130, "dataset_size": 10000, "steps": 300, "l2_clip_norm": 0.5}], **P)
led.commit("r5")
led.reserve("cifar", "r6", [{"sampling": "shuffle", "noise_multiplier": 2.5, "batch_size": 256,
                             "dataset_size": 50000, "steps": 390}], **P)
led.commit("r6", [{"sampling": "shuffle", "noise_multiplier": 2.5, "batch_size": 256, "dataset_size": 50000,
                   "steps": 195}])
led.reserve("text", "r7", [{"sampling": "poisson", "noise_multiplier": 1.0, "sample_rate": 0.05, "steps": 100},
                           {"sampling": "poisson", "noise_multiplier": 1.0, "sample_rate": 0.05, "steps": 50},
                           {"sampling": "poisson", "noise_multiplier": 2.0, "sample_rate": 0.05, "steps": 20}],
            parent_run_id="r1", **P)   # fine-tune of r1: also charged to mnist
led.commit("r7")
led.reserve("rdp_ar", "r8", [{"sampling": "poisson", "noise_multiplier": 0.9, "sample_rate": 1.0, "steps": 5},
                             {"sampling": "cyclic_poisson", "mechanism": "bandmf", "bands": 3,
                              "noise_multiplier": 1.7, "sample_rate": 0.1, "steps": 31, "l2_clip_norm": 2.0}], **P)
led.reserve("scratch", "r9", [{"sampling": "none", "steps": 7}], **P)   # unprotected dataset: recorded only
led.commit("r9")
exp = led.export()
exp["expected"] = {d: {"epsilon": s["epsilon"], "epsilon_committed": s["epsilon_committed"],
                       "plain_sum": s["plain_sum"],
                       "runs": {r["run_id"]: r["epsilon"] for r in s["runs"]}}
                   for d, s in exp["datasets"].items()}
def clean(v):
    import math
    if isinstance(v, float) and not math.isfinite(v):
        return "inf"
    if isinstance(v, dict): return {k: clean(x) for k, x in v.items()}
    if isinstance(v, list): return [clean(x) for x in v]
    return v
with open("tests/data/ledger_main.json", "w") as f:
    json.dump(clean(exp), f, indent=1, sort_keys=True)
    f.write("\n")
print(json.dumps(exp["expected"], indent=1))
