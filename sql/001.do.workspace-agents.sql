-- Agents that may report metadata. The token is shown once at creation; only
-- its SHA-256 is kept, unique so a token identifies its agent.
CREATE TABLE workspace_agents (
    id uuid PRIMARY KEY,
    name varchar(127) NOT NULL,
    token_hash bytea NOT NULL UNIQUE,
    created_at timestamp with time zone NOT NULL DEFAULT now()
);
