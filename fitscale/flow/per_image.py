"""One torchdiffeq solve per image, their velocity evaluations batched into shared forwards.

An adaptive solver picks its step size from an error norm over its whole state, so solving a
packed batch as one state makes every image depend on the others (the release does this: its
dopri5 images change with their batch). Here each image is its own `odeint` call, run in its
own thread; whenever every unfinished solve is waiting for a velocity, one call of the batched
velocity function serves them all, each image at its own time. An image therefore gets exactly
the steps it would get alone, while the model still sees packed batches (which shrink as images
finish). The solver arithmetic runs in the threads; every model call runs in the calling thread,
so autocast, CUDA device and stream settings apply to it as usual.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from fitscale.flow.samplers import odeint_endpoint

# (image numbers, states, times as 0-d tensors) -> velocities, one per image, shaped like its state
ImagesVelocityFn = Callable[[list[int], list[torch.Tensor], list[torch.Tensor]], list[torch.Tensor]]


@dataclass
class PerImageResult:
    """Each image's final state (t = 1), its own velocity-evaluation count, and the batched model calls
    made.
    """

    xs: list[torch.Tensor]  # each image's state at t = 1
    evaluations: list[int]  # velocity evaluations of each image
    calls: int  # calls of the batched velocity function (model forwards)


class _Aborted(Exception):
    """Ends the other solves once one solve or the velocity function failed."""


def integrate_per_image(
    velocity: ImagesVelocityFn,
    states: Sequence[torch.Tensor],
    method: str,
    steps: int = 50,
    atol: float = 1e-6,
    rtol: float = 1e-3,
    time_shift: float = 1.0,
) -> PerImageResult:
    """Solve dx/dt = v(x, t) from 0 to 1 for every state with its own torchdiffeq `method` call.

    `velocity(images, xs, ts)` evaluates any subset of the images together. The first error
    raised by a solve or by `velocity` is raised here once every thread has ended.
    """
    n = len(states)
    if n == 1:
        result = odeint_endpoint(
            lambda x, t: velocity([0], [x], [t])[0], states[0], method, steps, atol, rtol, time_shift
        )
        return PerImageResult([result.x], [result.evaluations], result.evaluations)
    condition = threading.Condition()
    requests: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    answers: dict[int, torch.Tensor] = {}
    errors: list[BaseException] = []
    running = n
    outputs: list[torch.Tensor | None] = [None] * n
    evaluations = [0] * n

    def solve(image: int) -> None:
        nonlocal running

        def image_velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            with condition:
                requests[image] = (x, t)
                condition.notify_all()
                condition.wait_for(lambda: image in answers or bool(errors))
                if errors:
                    raise _Aborted
                return answers.pop(image)

        try:
            result = odeint_endpoint(image_velocity, states[image], method, steps, atol, rtol, time_shift)
            outputs[image], evaluations[image] = result.x, result.evaluations
        except _Aborted:
            pass
        except BaseException as error:  # noqa: BLE001 - handed to the calling thread
            with condition:
                errors.append(error)
        finally:
            with condition:
                running -= 1
                condition.notify_all()

    threads = [threading.Thread(target=solve, args=(i,), daemon=True) for i in range(n)]
    for thread in threads:
        thread.start()
    calls = 0
    try:
        while True:
            with condition:
                condition.wait_for(lambda: bool(errors) or running == 0 or len(requests) == running)
                if errors or running == 0:
                    break
                images = sorted(requests)
                pending = [requests.pop(i) for i in images]
            velocities = velocity(images, [x for x, _ in pending], [t for _, t in pending])
            calls += 1
            with condition:
                answers.update(zip(images, velocities))
                condition.notify_all()
    except BaseException as error:
        with condition:
            errors.append(error)
            condition.notify_all()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    return PerImageResult(outputs, evaluations, calls)  # type: ignore[arg-type]


__all__ = ["ImagesVelocityFn", "PerImageResult", "integrate_per_image"]
