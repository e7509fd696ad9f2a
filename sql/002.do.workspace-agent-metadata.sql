-- The original's columns and primary key (coder migrations 000111 and 000188).
-- Unlike the original this table is LOGGED: an UNLOGGED table is emptied after
-- a Postgres crash, and metabatch promises that an acknowledged value stays.
-- Rows are created when an agent declares its keys; reports only UPDATE them.
CREATE TABLE workspace_agent_metadata (
    workspace_agent_id uuid NOT NULL,
    display_name varchar(127) NOT NULL,
    key varchar(127) NOT NULL,
    script varchar(65535) NOT NULL,
    value varchar(65535) NOT NULL DEFAULT '',
    error varchar(65535) NOT NULL DEFAULT '',
    timeout bigint NOT NULL,
    interval bigint NOT NULL,
    collected_at timestamp with time zone NOT NULL DEFAULT '0001-01-01 00:00:00+00',
    display_order integer NOT NULL DEFAULT 0,
    PRIMARY KEY (workspace_agent_id, key),
    FOREIGN KEY (workspace_agent_id) REFERENCES workspace_agents(id) ON DELETE CASCADE
);

COMMENT ON COLUMN workspace_agent_metadata.display_order IS 'Specifies the order in which to display agent metadata in user interfaces.';
