"""Decoding applications over a trained model: the continuous-batching engine and its two front ends.

`engine` ties a tensor-free `scheduler` (who runs), a model `runner` (prefill, decode, cache rows) and `sampling`;
`text` turns engine tokens into text for both `server` (`parloop serve`) and `generate` (`parloop generate`);
`loading` reads a model directory; `protocol` holds the OpenAI request bodies and errors.
"""
