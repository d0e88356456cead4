"""Shared fixtures: a tiny random BERT (for fast unit tests) and small local data files."""

from __future__ import annotations

import contextlib
import csv
import os
import random
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


@pytest.fixture(scope="session", autouse=True)
def _one_ray_for_the_session_s_simulations():
    """Keep one Ray instance between the in-process simulations of the session.

    Flower's Ray backend starts Ray for every ``run_simulation`` and shuts it down after
    (6-12 s a simulation on 2 cores; the slow tier runs dozens). Here a simulation reuses the
    Ray that the last one started when nothing its workers inherit has changed: the same
    ``init_args`` (num_cpus), environment variables (pytest's PYTEST_CURRENT_TEST aside),
    working directory and sys.path;
    otherwise Ray is restarted as before. The idle actors of a finished simulation (worker
    processes with torch, transformers and peft imported: 5-8 s each to start on 2 cores) serve
    the next one that asks for the same client resources on the same Ray; busy ones
    (stragglers) and any that died are killed or dropped, as the shutdown did. An actor keeps
    nothing of fedlora's per-process state between simulations (forget_process_state).
    Set FEDLORA_TEST_FRESH_RAY=1 for Flower's own start-and-stop per simulation."""
    if os.environ.get("FEDLORA_TEST_FRESH_RAY") == "1":
        yield
        return
    try:
        import ray
        from flwr.server.superlink.fleet.vce.backend.raybackend import RayBackend
        from flwr.simulation.ray_transport.ray_actor import BasicActorPool, ClientAppActor

        from fedlora.runtime import forget_process_state
    except ImportError:
        yield
        return
    init_ray, terminate, build = RayBackend.init_ray, RayBackend.terminate, RayBackend.build
    started: dict = {}
    idle: dict = {}  # (Ray's key, client resources, actor kwargs) -> idle actors

    def inherited(backend, backend_config):
        return (repr(sorted((backend_config.get(backend.init_args_key) or {}).items())),
                tuple(sorted((k, v) for k, v in os.environ.items() if k != "PYTEST_CURRENT_TEST")),
                os.getcwd(), tuple(sys.path))

    def init_or_reuse(self, backend_config):
        if ray.is_initialized() and started.get("key") != inherited(self, backend_config):
            ray.shutdown()
            idle.clear()  # their processes went with that Ray
        init_ray(self, backend_config)  # starts Ray only when it is not running
        started["key"] = inherited(self, backend_config)  # (init_ray sets PYTHONPATH)

    def pool_key(self):
        return (started.get("key"), repr(sorted(self.client_resources.items())),
                repr(sorted((self.actor_kwargs or {}).items())))

    def forgot(actor) -> bool:
        """The actor is alive and dropped the process state of the runs it served."""
        try:
            ray.get(actor.__ray_call__.remote(lambda _: forget_process_state()), timeout=30)
            return True
        except Exception:
            return False

    def build_from_idle(self, app_fn):
        if not ray.is_initialized():
            return build(self, app_fn)
        self.pool = BasicActorPool(actor_type=ClientAppActor,
                                   client_resources=self.client_resources,
                                   actor_kwargs=self.actor_kwargs)
        kept = [a for a in idle.pop(pool_key(self), []) if forgot(a)]
        for actor in kept[self.pool.actors_capacity:]:
            with contextlib.suppress(Exception):
                ray.kill(actor)
        kept = kept[: self.pool.actors_capacity]
        self.pool.pool.extend(kept)
        self.pool.num_actors += len(kept)
        self.pool.add_actors_to_pool(self.pool.actors_capacity - len(kept))
        self.app_fn = app_fn

    def keep_idle_actors(self):
        pool = self.pool
        if pool is None:
            return
        busy = list(getattr(pool, "_future_to_actor", {}).values())
        for actor in busy:
            with contextlib.suppress(Exception):
                ray.kill(actor)
        idle.setdefault(pool_key(self), []).extend(a for a in pool.pool if a not in busy)
        self.pool = None

    RayBackend.init_ray, RayBackend.build = init_or_reuse, build_from_idle
    RayBackend.terminate = keep_idle_actors
    try:
        yield
    finally:
        RayBackend.init_ray, RayBackend.terminate, RayBackend.build = init_ray, terminate, build
        if ray.is_initialized():
            ray.shutdown()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A 2-layer, 32-wide random BERT with MiniLM's tokenizer, saved as a local folder."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    from fedlora.tasks import minilm_path

    path = tmp_path_factory.mktemp("tiny-bert")
    tok = AutoTokenizer.from_pretrained(minilm_path())
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=128, num_labels=2,
    )
    BertForSequenceClassification(config).save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def smollm2_cache(tmp_path_factory):
    """An empty model cache for the session (FEDLORA_CACHE; Ray workers inherit it): the
    real SmolLM2 is converted into it once, by the first slow test that needs it."""
    path = tmp_path_factory.mktemp("fedlora-cache")
    old = os.environ.get("FEDLORA_CACHE")
    os.environ["FEDLORA_CACHE"] = str(path)
    yield path
    if old is None:
        os.environ.pop("FEDLORA_CACHE", None)
    else:
        os.environ["FEDLORA_CACHE"] = old


WORDS_POS = "great wonderful moving superb brilliant charming funny".split()
WORDS_NEG = "dull boring awful tedious clumsy bland messy".split()


def write_reviews(path: Path, n: int, seed: int = 0, fmt: str = "csv") -> Path:
    """A small synthetic, learnable sentiment file (text, label in {negative, positive})."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        pos = i % 2 == 0
        words = rng.sample(WORDS_POS if pos else WORDS_NEG, 3)
        rows.append({"text": f"the film was {' and '.join(words)}", "label":
                     "positive" if pos else "negative", "site": f"s{i % 3}"})
    if fmt == "csv":
        with path.open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=["text", "label", "site"])
            w.writeheader()
            w.writerows(rows)
    else:
        import json
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture()
def reviews_csv(tmp_path) -> Path:
    return write_reviews(tmp_path / "reviews.csv", 120)


def assert_noise_std(samples, expected: float, z: float = 6.0) -> None:
    """The sample std of ``samples`` matches ``expected`` within ``z`` standard errors.

    For n Gaussian draws the sample std has relative standard error about 1/sqrt(2n), so a fixed
    tolerance fails by chance on small samples (a 5% band on 1,090 draws is 2.3 standard errors:
    one run in fifty). z = 6 keeps the check sharp: a noise scale off by 2x, or noise an attacker
    can cancel (std near 0), misses by far more."""
    import numpy as np

    x = np.asarray(samples, dtype=np.float64).ravel()
    rel = z / np.sqrt(2 * x.size)
    assert rel < 0.5, f"{x.size} draws are too few to tell a noise scale off by 2x"
    got = x.std()
    assert abs(got / expected - 1) <= rel, (
        f"noise std {got:.6g} vs expected {expected:.6g}: off by {got / expected - 1:+.1%}, "
        f"tolerance {rel:.1%} ({z} standard errors on {x.size} draws)")


@pytest.fixture()
def identity(monkeypatch):
    """What Flower sets in a process that makes messages (so that a test can make them)."""
    from flwr.supercore.task_identity import TaskIdentity  # Flower loads late: conftest stays cheap

    for attr, value in (("_run_id", 1), ("_node_id", 0), ("_task_id", 1)):
        monkeypatch.setattr(TaskIdentity, attr, value)


@pytest.fixture()
def site(tmp_path, tiny_model_dir):
    """A run-config on a tiny model and one site's data file."""
    data = write_reviews(tmp_path / "site.csv", 120, seed=3)
    return {"task": "custom", "model-path": str(tiny_model_dir), "data-path": str(data),
            "labels": "negative,positive", "lora-rank": 4, "lora-alpha": 8.0,
            "num-server-rounds": 4, "local-steps": 2, "batch-size": 16, "max-length": 16,
            "num-partitions": 2, "target-delta": 1e-3, "update-max-norm": 0.05,
            "output-dir": str(tmp_path / "results"), "run-name": "attack"}


@pytest.fixture()
def custom_task(tmp_path, tiny_model_dir):
    """A run-config of the custom task on the tiny model: 4 partitions, 2 rounds."""
    data = write_reviews(tmp_path / "train.csv", 200, seed=1)
    test = write_reviews(tmp_path / "test.csv", 40, seed=2)
    return {
        "task": "custom", "model-path": str(tiny_model_dir), "data-path": str(data),
        "test-data-path": str(test), "labels": "negative,positive", "lora-rank": 4,
        "lora-alpha": 8.0, "num-server-rounds": 2, "local-steps": 3, "batch-size": 8,
        "fraction-train": 0.5, "fraction-evaluate": 0.5, "max-length": 16,
        "output-dir": str(tmp_path / "results"), "run-name": "tiny", "num-partitions": 4,
    }
