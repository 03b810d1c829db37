"""Off-the-shelf Confluent clients against feedloop's registry and the broker.

1. Reads the records the Rust side produced to RUST_TOPIC with AvroDeserializer.
2. Serializes records with AvroSerializer (auto-registering their schema), produces them to
   PY_TOPIC, and reads them back with AvroDeserializer.
3. Exercises SchemaRegistryClient lookups.

Prints one JSON document with everything it saw; the Rust test asserts on it.
"""

import json
import os
import sys
import uuid

from confluent_kafka import Consumer, Producer
from confluent_kafka.schema_registry import Schema, SchemaRegistryClient
from confluent_kafka.schema_registry.avro import AvroDeserializer, AvroSerializer
from confluent_kafka.serialization import MessageField, SerializationContext

REGISTRY = os.environ["REGISTRY_URL"]
AUTH = os.environ["REGISTRY_AUTH"]
BOOTSTRAP = os.environ["KAFKA_BOOTSTRAP"]
RUST_TOPIC = os.environ["RUST_TOPIC"]
PY_TOPIC = os.environ["PY_TOPIC"]
EXPECTED = int(os.environ["RUST_COUNT"])

PY_SCHEMA = json.dumps({
    "type": "record",
    "name": "PythonEvent",
    "namespace": "io.feedloop.test",
    "fields": [
        {"name": "id", "type": {"type": "string", "logicalType": "uuid"}},
        {"name": "n", "type": "long"},
        {"name": "tags", "type": {"type": "array", "items": "string"}},
        {"name": "note", "type": ["null", "string"], "default": None},
    ],
})


def consume(topic, deserializer, count):
    consumer = Consumer({
        "bootstrap.servers": BOOTSTRAP,
        "group.id": "py-" + uuid.uuid4().hex,
        "auto.offset.reset": "earliest",
        "enable.auto.commit": False,
    })
    consumer.subscribe([topic])
    out = []
    idle = 0
    while len(out) < count and idle < 60:
        msg = consumer.poll(1.0)
        if msg is None:
            idle += 1
            continue
        if msg.error():
            raise RuntimeError(str(msg.error()))
        value = deserializer(msg.value(), SerializationContext(topic, MessageField.VALUE))
        out.append(value)
    consumer.close()
    return out


def main():
    client = SchemaRegistryClient({"url": REGISTRY, "basic.auth.user.info": AUTH})

    rust_records = consume(RUST_TOPIC, AvroDeserializer(client), EXPECTED)

    serializer = AvroSerializer(client, PY_SCHEMA, conf={"auto.register.schemas": True})
    producer = Producer({"bootstrap.servers": BOOTSTRAP, "enable.idempotence": True, "acks": "all"})
    sent = []
    for i in range(5):
        record = {"id": str(uuid.uuid4()), "n": i * 1000, "tags": ["t%d" % i], "note": None if i % 2 else "odd"}
        sent.append(record)
        payload = serializer(record, SerializationContext(PY_TOPIC, MessageField.VALUE))
        producer.produce(PY_TOPIC, key=record["id"], value=payload)
    producer.flush(30)
    py_back = consume(PY_TOPIC, AvroDeserializer(client), len(sent))

    subject = PY_TOPIC + "-value"
    latest = client.get_latest_version(subject)
    looked_up = client.lookup_schema(subject, Schema(PY_SCHEMA, "AVRO"))
    again = client.register_schema(subject, Schema(PY_SCHEMA, "AVRO"))
    fetched = client.get_schema(latest.schema_id)

    json.dump({
        "rust_records": rust_records,
        "py_sent": sent,
        "py_back": py_back,
        "subject": subject,
        "latest_id": latest.schema_id,
        "latest_version": latest.version,
        "lookup_id": looked_up.schema_id,
        "reregister_id": again,
        "fetched_type": fetched.schema_type,
        "subjects": client.get_subjects(),
    }, sys.stdout, default=str)


if __name__ == "__main__":
    main()
