-- The examples an erasure request removed from the datasets (issue 20), recorded in the same
-- transaction as the rewrite, so that the eraser's labels_topic target tombstones exactly their
-- keys on feedloop.labels.<dataset> even after a crash. Rows hold no user id; they are deleted
-- when the request completes.
CREATE TABLE labeler.erased_examples (
    request_id uuid NOT NULL,
    dataset    text NOT NULL,
    example_id text NOT NULL,
    PRIMARY KEY (request_id, dataset, example_id)
);
