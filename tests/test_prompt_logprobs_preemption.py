"""prompt_logprobs of a request preempted while its prompt was being prefilled in chunks:
one entry per prompt token, whatever the preemptions (issue 22, point 1)."""

from __future__ import annotations

from ipc.messages import SamplingParams


def test_prompt_logprobs_survive_preemption_mid_prefill(stories_path):
    from headrace.llm import LLM

    args = dict(block_size=16, max_num_batched_tokens=3, enable_prefix_caching=False)
    llm = LLM(str(stories_path), device="cpu", num_gpu_blocks=2, **args)
    short = [1, 403, 407, 261, 378]
    long = [1, *range(300, 319)]  # 20 tokens
    params = [
        SamplingParams(temperature=0, max_tokens=20, ignore_eos=True),
        SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=0),
    ]
    r = llm.generate([short, long], params)[1]
    assert llm.engine.scheduler.num_preemptions > 0, "the test meant to force preemption"
    plp = r.prompt_logprobs
    assert plp is not None and len(plp) == len(long) and plp[0] is None
    assert [p.token_ids[0] for p in plp[1:]] == long[1:]

    # The same values as a run with room to spare (no preemption).
    roomy = LLM(str(stories_path), device="cpu", **args)
    ref = roomy.generate([long], params[1])[0].prompt_logprobs
    assert roomy.engine.scheduler.num_preemptions == 0
    assert ref is not None
    for got, want in zip(plp[1:], ref[1:], strict=True):
        assert got is not None and want is not None
        assert abs(got.logprobs[0] - want.logprobs[0]) < 1e-4
