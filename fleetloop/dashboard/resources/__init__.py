"""The parts of the dashboard's model, one per resource of the API (fleetloop/dashboard/api.py):
episodes (with labels, tasks, series), robots (with control), policies (with steering), learner
(with queue and ingest), audit. fleetloop.dashboard.service.Dashboard composes them."""
