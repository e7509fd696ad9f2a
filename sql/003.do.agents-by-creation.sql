-- GET /v1/agents pages through agents in (created_at, id) order with a
-- keyset cursor: this index makes each page one index range scan, whatever
-- the page number.
CREATE INDEX workspace_agents_created_at_id ON workspace_agents (created_at, id);
