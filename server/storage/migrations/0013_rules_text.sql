-- The text of the rule set `rules_state.version` names (issue 17): front ends sharing one store
-- follow the rules another applied (notified, then read here), and one that starts with an
-- older rules file takes these instead. NULL in stores from before, and until a change.
ALTER TABLE rules_state ADD COLUMN text BLOB;
