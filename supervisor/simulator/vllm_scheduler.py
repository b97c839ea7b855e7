"""vLLM-on-Neuron scheduling: continuous batching over ``max-num-seqs`` slots.

optimum-neuron's vLLM model runner (``optimum/neuron/vllm/runner.py``,
``OptimumNeuronModelRunner.execute_model``, main @213224e6) runs one engine step as: decode
the next token of every request already in the batch, *then* prefill the requests the vLLM
scheduler admitted into free slots ("We cannot process prompt and decode requests together,
because they use different graphs"), and returns one token for each. So, unlike TGI Neuron
(``NeuronBatcher``: a prefill step pauses the running slots), running requests still get a
token in a step that admits new ones; that step lasts the decode plus the prefill.

Only the policy lives here: step durations come from the shared timing model
(``NeuronTiming.prefill`` / ``decode``), the waiting queue is the batcher's (unbounded for
vLLM: ``vllm_server.create_app`` sets no concurrency cap).
"""

from __future__ import annotations

from .engine import NeuronBatcher, Step


class ContinuousBatcher(NeuronBatcher):
    def plan(self, now: float) -> Step | None:
        running = list(self.running)
        admitted = self.admit(now)
        if admitted:
            duration = self.timing.prefill(sum(j.input_length for j in admitted), len(admitted))
            if running:
                duration += self.timing.decode(len(running))
            # A "prefill" step to the engine (its prefill faults judge it), holding the
            # new requests first and the running ones after: each gets one token.
            return Step("prefill", duration / self.speed, (*admitted, *running))
        if running:
            return Step("decode", self.timing.decode(len(running)) / self.speed, tuple(running))
        return None
