"""The backend-neutral Episode over the PyTorch stages (TorchRunner): same logits as Pipeline, errors."""

from __future__ import annotations

import pytest
import torch

from fssam_deploy.backends.pytorch import TorchRunner, torch_runners
from fssam_deploy.episode import Episode
from fssam_deploy.errors import EngineError, InputError
from fssam_deploy.stages import STAGE_SPECS
from tests.helpers import make_episode


@pytest.fixture(scope="module")
def episode(tiny_pipeline, tiny_cfg):
    return Episode(torch_runners(tiny_pipeline.stages, tiny_cfg), tiny_cfg, "cpu")


@pytest.mark.parametrize("shots", [1, 5])
def test_torch_episode_equals_pipeline(episode, tiny_pipeline, tiny_cfg, shots):
    q, sx, sy = make_episode(tiny_cfg, batch=1, shots=shots, seed=20 + shots)
    with episode.timing() as times:
        got = episode.segment(q, sx, sy)
    torch.testing.assert_close(got, tiny_pipeline.segment(q, sx, sy), atol=0, rtol=0)
    assert sorted(times) == sorted(STAGE_SPECS) and all(t > 0 for t in times.values())
    assert episode.stage_times is None  # outside `timing()` nothing is timed or synchronised


def test_torch_support_session_equals_pipeline(episode, tiny_pipeline, tiny_cfg):
    """One support set shared by a batch of 2 queries, as `Pipeline.with_supports`."""
    _, sx, sy = make_episode(tiny_cfg, batch=1, seed=31)
    q2, _, _ = make_episode(tiny_cfg, batch=2, seed=32)
    want = tiny_pipeline.with_supports(sx, sy).segment(q2)
    torch.testing.assert_close(episode.with_supports(sx, sy).segment(q2), want, atol=0, rtol=0)


def test_runner_outputs_have_spec_shapes(episode, tiny_cfg):
    """Every stage's module gives the shapes its spec declares (the DINOv2 axes "Cd" and "g" included)."""
    for name, spec in STAGE_SPECS.items():
        feed = spec.dummy_inputs(tiny_cfg, batch=1, shots=2)
        got = episode.runners[name].infer(feed)
        want = spec.shapes(tiny_cfg, 1, 2)
        assert list(got) == spec.output_names
        assert {k: tuple(v.shape) for k, v in got.items()} == {k: want[k] for k in spec.output_names}, name


def test_static_batch_runners_run_in_chunks(tiny_pipeline, tiny_cfg):
    """Runners of a static batch 1 (like graphs exported with --batch 1) still run a batch of 2."""
    runners = {name: TorchRunner(r.module, r.spec, {k: (1, *s[1:]) for k, s in r.input_shapes.items()})
               for name, r in torch_runners(tiny_pipeline.stages, tiny_cfg).items()}
    q, sx, sy = make_episode(tiny_cfg, batch=2, seed=9)
    got = Episode(runners, tiny_cfg).segment(q, sx, sy)
    torch.testing.assert_close(got, tiny_pipeline.segment(q, sx, sy), atol=1e-4, rtol=1e-4)


def test_smaller_batches_are_padded_to_the_static_one(tiny_pipeline, tiny_cfg):
    """Runners of a static batch 2 (graphs exported with --batch 2) run a batch of 1 and of 3: the last chunk is
    padded with copies of its last item and their outputs dropped (a server's single request, its warm-up)."""
    seen = []

    class Two(TorchRunner):
        def infer_impl(self, feed):
            seen.append(next(iter(feed.values())).shape[0])
            return super().infer_impl(feed)

    runners = {name: Two(r.module, r.spec, {k: (2, *s[1:]) for k, s in r.input_shapes.items()})
               for name, r in torch_runners(tiny_pipeline.stages, tiny_cfg).items()}
    q, sx, sy = make_episode(tiny_cfg, batch=3, seed=9)
    ep = Episode(runners, tiny_cfg)
    three = ep.segment(q, sx, sy)
    assert set(seen) == {2}
    torch.testing.assert_close(three, tiny_pipeline.segment(q, sx, sy), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(ep.segment(q[2:], sx[2:], sy[2:]), three[2:], atol=1e-4, rtol=1e-4)


def test_errors(episode, tiny_pipeline, tiny_cfg):
    runners = torch_runners(tiny_pipeline.stages, tiny_cfg)
    del runners["prior"], runners["dino_features"]
    with pytest.raises(EngineError, match=r"no runner for stages \['dino_features', 'prior'\]"):
        Episode(runners, tiny_cfg)
    feed = STAGE_SPECS["prior"].dummy_inputs(tiny_cfg, batch=1, shots=1)
    feed["query_dino"] = feed["query_dino"][:, :100]
    with pytest.raises(InputError, match=r"torch:prior: input 'query_dino' has shape \(1, 100, 40, 40\), "
                                         r"the graph expects \(\*, 384, 40, 40\)"):
        episode.runners["prior"].infer(feed)
    q, sx, sy = make_episode(tiny_cfg, batch=2, seed=1)
    session = episode.with_supports(sx, sy)
    with pytest.raises(InputError, match=r"query: expected shape \(2, 3, 256, 256\), got \(3, 3, 256, 256\)"):
        session.segment(torch.cat([q, q[:1]]))
