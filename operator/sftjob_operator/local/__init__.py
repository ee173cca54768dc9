"""`sftjob run`: the operator's pipeline (train -> eval -> merge) on one machine, no cluster."""
