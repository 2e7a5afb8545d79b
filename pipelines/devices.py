"""`--device` of the Beam jobs that run torch (`embed`, `score-batch --run`).

On a runner whose workers run here (the DirectRunner), the device is resolved at launch: CUDA
asked for and not there is the one-line error of `models/device.py`, before the pipeline starts.
On other runners the workers decide: each resolves the spec when it loads its model
(`worker_placement`), and one without a GPU logs one warning line and runs on its CPU, the way
Beam's PyTorch model handlers treat `device='GPU'`.
"""

from __future__ import annotations

from apache_beam.options.pipeline_options import PipelineOptions

from nlpctr.models.device import Placement, device_spec, resolve_device
from nlpctr.pipelines.loopback import runs_here


def launch_device(spec: str | None, options: PipelineOptions) -> str:
    """The device spec a job hands its workers: resolved here when they run here, else checked.

    Raises:
        UserError: a bad spec, or (workers here) CUDA asked for and not there.
    """
    text = device_spec(spec)
    return str(resolve_device(text)) if runs_here(options) else text


def worker_placement(spec: str) -> Placement:
    """A worker's placement for inference: the device `spec` names, or the CPU with one warning
    line when it names a GPU this worker lacks; float32 (embeddings are features: no autocast)."""
    return Placement(resolve_device(spec, fallback=True), "fp32")
