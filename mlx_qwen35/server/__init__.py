"""``mlx_qwen35 serve``: an OpenAI-compatible HTTP server for the model.

* :mod:`.app`: routes, auth, limits and errors (Starlette, served by uvicorn);
* :mod:`.protocol` and :mod:`.messages`: the request's fields checked, the responses built;
* :mod:`.worker`: the one thread that runs the model, requests queued in arrival order;
* :mod:`.prompt_cache`: cache states at message boundaries, so a growing conversation prefills only its new tokens;
* :mod:`.cli`: the command.

Importing this package imports none of them (``mlx_qwen35 --help`` stays fast).
"""
