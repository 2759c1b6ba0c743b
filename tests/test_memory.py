"""batch_size="auto": a batch that runs out of memory is retried smaller, keeping the cells already done."""

from __future__ import annotations

import pytest
import torch

import vlm_interp as vi
from vlm_interp.corruptions import noise
from vlm_interp.sites import Site
from vlm_interp.tiny import tiny
from vlm_interp.tracing import fast, memory
from vlm_interp.tracing.engine import Cell, run_cells, site_activations
from vlm_interp.tracing.memory import BatchSizeWarning
from vlm_interp.tracing.metrics import make_metric

ROWS_THAT_FIT = 3


@pytest.fixture(scope="module")
def sweep(image):
    vlm = vi.wrap(*tiny("llava"))
    clean = vlm.prepare(image, "Is there a red circle ?", answer="yes")
    corrupt = noise(vlm, clean, scale="3sd", tokens="image", seed=0)
    cells = [Cell((Site("lm", c, l),), (p,)) for c in ("hidden", "mlp") for l in range(2)
             for p in range(clean.n_tokens)]
    source = site_activations(vlm, clean, {s for c in cells for s in c.sites})
    metric = make_metric(vlm, clean, "logprob")
    reference = {path: run_cells(vlm, corrupt, source, cells, metric, batch_size=4, progress=False, fast_path=path)
                 for path in (True, False)}
    return vlm, corrupt, source, cells, metric, reference


@pytest.mark.parametrize("fast_path", [True, False])
def test_auto_batches_back_off_after_running_out_of_memory(sweep, monkeypatch, fast_path):
    vlm, corrupt, source, cells, metric, reference = sweep
    done = []  # rows of every forward that finished: a cell computed twice would count twice
    target = (fast.LMStart, "logits") if fast_path else (type(vlm), "logits")
    real = getattr(*target)

    def limited(self, *args, **kw):
        rows = args[0] if fast_path else next(iter(args[0].values())).shape[0]
        if rows > ROWS_THAT_FIT:
            raise torch.OutOfMemoryError(f"{rows} rows do not fit")
        done.append(rows)
        return real(self, *args, **kw)

    monkeypatch.setattr(*target, limited)
    monkeypatch.setattr(memory, "available_memory", lambda device: 10 ** 12)  # "auto" starts at 64 rows
    with pytest.warns(BatchSizeWarning, match="retrying with 32"):
        out = run_cells(vlm, corrupt, source, cells, metric, batch_size="auto", progress=False, fast_path=fast_path)
    torch.testing.assert_close(out, reference[fast_path], atol=1e-5, rtol=0)
    assert max(done) <= ROWS_THAT_FIT
    rows = sum(done) - (0 if fast_path else 1)  # "auto" sizing reads the towers' shapes in a single-row forward first
    done.clear()
    run_cells(vlm, corrupt, source, cells, metric, batch_size=ROWS_THAT_FIT, progress=False, fast_path=fast_path)
    assert rows == sum(done)  # no finished cell was computed again
    with pytest.raises(torch.OutOfMemoryError):  # a batch size the caller chose is not changed behind their back
        run_cells(vlm, corrupt, source, cells, metric, batch_size=8, progress=False, fast_path=fast_path)


def test_planned_bytes_is_rows_times_row_bytes(sweep):
    vlm, corrupt, *_ = sweep
    plan = memory.planned_bytes(vlm, corrupt, 5, 100)
    assert plan == {"rows": 5, "row_bytes": memory.row_bytes(vlm, corrupt), "bound": 5 * memory.row_bytes(vlm, corrupt)}
