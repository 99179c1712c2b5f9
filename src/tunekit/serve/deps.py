"""What every route asks first: whose request this is (its project), the store, and what that project may see.

One rule of visibility for every route family: a file, a job or a fine-tuned model belongs to the project of the
API key that made it, and another project's object does not exist for a request (404), exactly as an unknown id.
Files and jobs are looked up in the store under the request's project (`Store.file(project, id)`,
`Store.job(project, id)`); served models go through `visible_models`, which is the same rule for models: the
server's own models (given on its command line) are everyone's, a fine-tuned model is its project's, and also
the projects' it was shared with by a checkpoint permission (permissions.py): chat, jobs (continued fine-tuning),
evals and graders may then use it; managing it (its permissions, deleting it) stays with its own project.
"""

from __future__ import annotations

from fastapi import Request

from tunekit.generate.models import Served
from tunekit.serve.azure import deployment_not_found, resolve
from tunekit.serve.errors import APIError
from tunekit.serve.store import DEFAULT_PROJECT, Store


def project_of(request) -> str:
    """The project of the request's API key (set by the app's guard); `local` on a server without keys."""
    return getattr(request.state, "project", None) or DEFAULT_PROJECT


def store_of(request: Request) -> Store:
    store = request.app.state.store
    if store is None:
        raise APIError(400, "this server keeps no files or jobs: start it with --data-dir DIR",
                       code="no_data_dir")
    return store


def visible_models(state, project: str) -> dict[str, Served]:
    """The served models `project` may use: the server's own, its project's fine-tuned models, and the other
    projects' fine-tuned models and checkpoints shared with it (`state.shared_with`, from the store)."""
    owners, shared = state.model_owner, getattr(state, "shared_with", {}).get(project, frozenset())
    return {name: s for name, s in state.models.items() if owners.get(name) in (None, project) or name in shared}


def find_model(request: Request, name: str, *, status: int = 404) -> Served:
    """A model the request's project may use, else `status` (404 on a model's own route, 400 when a request
    body names it) naming `model` and the models it may use. `name` may be a deployment's (azure.py); a request
    on Azure's deployment path uses the path's deployment instead (404 `DeploymentNotFound` when none)."""
    state, project = request.app.state, project_of(request)
    models = visible_models(state, project)
    deployment = getattr(request.state, "deployment", None)  # Azure's /openai/deployments/{name}/...
    if deployment is not None:  # the path names the model; Azure ignores the body's `model`
        found = resolve(state, project, deployment, models)
        if found is None:
            raise deployment_not_found(deployment, project, state, models)
        return models[found]
    served = models.get(resolve(state, project, name, models) or name)  # a name, or a deployment's name
    if served is None:
        known = ", ".join(sorted(models)) or "none"
        raise APIError(status, f"The model {name!r} does not exist (served: {known})", param="model",
                       code="model_not_found")
    return served
