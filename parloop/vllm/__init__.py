"""PLT inside vLLM: an out-of-tree model plugin (docs/vllm.md).

vLLM finds it through the `vllm.general_plugins` entry point (`parloop.vllm.plugin:register`), so `vllm serve DIR`
and `vllm.LLM(DIR)` load a LoopCoder-V2-format checkpoint without `import parloop` in the user's code. The rest of
parloop imports nothing here (vLLM is an optional extra, `pip install "parloop[vllm]"`), but for `parloop bench
--engine vllm`, which loads the benchmark when it runs.
"""
