"""Every business rule of the fleet, by concern (docs/architecture.md, "Control plane"):

- `errors`      refusals with a sentence for people and an HTTP status
- `transitions` the node state machine's moves, claimed atomically and recorded with a cause
- `nodes`       hosts, placing and requesting nodes, retry, deletion, force, credentials
- `jobs`        provisioning jobs: claim, run (ansible-runner), finish, cancel, recover
- `agents`      the control plane as a client of node agents: health (which node answered), polls
- `heartbeats`  the agents' outbound channel: authentication, liveness, at-least-once actions
- `enrollment`  one-time links that turn a customer's machine into a node
- `sweeps`      the periodic work of Celery beat: nothing stuck, nothing silent, nothing kept
                for ever
- `queue`       sending tasks to Celery by name (services never import tasks)

Views and tasks parse input and call one of these. Work is claimed atomically
(`filter(pk=..., state=old).update(state=new)`, continue only when one row changed), so two
workers, a retry and a sweep never act on the same job or node twice.
"""
