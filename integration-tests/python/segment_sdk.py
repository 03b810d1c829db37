"""The official Segment Python SDK (segment-analytics-python), pointed at feedloop's collector
by changing only its host. Prints the message ids it sent, as JSON."""

import datetime
import json
import os
import sys
import uuid

from segment import analytics
import segment.analytics.request as segment_request


class DeviceClock(datetime.datetime):
    """The device's clock runs 120 s fast, for event times and for sentAt alike."""

    @classmethod
    def now(cls, tz=None):
        return datetime.datetime.now(tz) + datetime.timedelta(seconds=120)


segment_request.datetime = DeviceClock

errors = []
analytics.write_key = os.environ["WRITE_KEY"]
analytics.host = os.environ["COLLECTOR_URL"]
analytics.sync_mode = True
analytics.gzip = True
analytics.on_error = lambda error, items: errors.append(str(error))

user = os.environ["USER_ID"]
match_id = str(uuid.uuid4())
# Events happened just now, by the fast device clock: the collector corrects them from sentAt.
skewed = DeviceClock.now(datetime.timezone.utc)
sent = []
for kind, call in [
    ("track", lambda mid: analytics.track(user, "Match Decision", {"match_id": match_id, "decision": "accept"},
                                          context={"os": {"name": "iOS", "version": "17.1"}, "app": {"version": "9.9"}, "device": {"id": "dev-sdk"}},
                                          timestamp=skewed, message_id=mid)),
    ("screen", lambda mid: analytics.screen(user, name="Matches", properties={"tab": "new"}, timestamp=skewed, message_id=mid)),
    ("identify", lambda mid: analytics.identify(user, {"email": "someone@example.com", "plan": "pro"}, message_id=mid)),
    ("unknown", lambda mid: analytics.track(user, "Song Played", {"song": "x"}, message_id=mid)),
]:
    mid = "sdk-" + uuid.uuid4().hex
    call(mid)
    sent.append({"kind": kind, "message_id": mid})
analytics.flush()
json.dump({"sent": sent, "errors": errors, "match_id": match_id}, sys.stdout)
