"""Decoding applications over a trained model: the continuous-batching engine and its two front ends.

`engine` ties a tensor-free `scheduler` (who runs, bounded queue), a model `runner` (prefill, decode, cache rows) and
`sampling` (numerically safe picks, penalties, log-probabilities); `text` turns engine tokens into text (stop strings
matched in linear time) for both `server` (`parloop serve`: options and uvicorn) and `generate` (`parloop generate`);
the server's `routes` answer OpenAI's API with `jobs` (one request in the engine), behind `guard` (API key, Host and
Origin checks, body limits and deadlines), counted by `metrics`; `protocol` holds the request and response bodies and
errors; `loading` reads a model directory. docs/serving.md describes the server's limits and options.
"""
