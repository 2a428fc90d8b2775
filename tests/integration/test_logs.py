"""The application log carries no patient data by default: no names, IDs, birth dates, query values
or UIDs, whatever the traffic (matches, failures, bad input, aborted streams)."""

from __future__ import annotations

import httpx
from pydicom.dataset import Dataset

from gateway.demo.pacs import DemoPACS
from tests.support.gatewayproc import GatewayProcess


def test_log_has_no_patient_data(gateway: GatewayProcess, studies: list[Dataset], chaos: DemoPACS) -> None:
    with httpx.Client(timeout=30) as client:
        for node in ("demo", "demo-hier", "orthanc", "dcmqrscp"):
            client.get(gateway.url(node, "/studies"), params={"PatientName": "Müller*", "PatientID": "DEMO-0002"})
            client.get(gateway.url(node, "/series"), params={"PatientBirthDate": "19580412", "Modality": "CT"})
            study = next(d.StudyInstanceUID for d in studies if d.PatientID == "DEMO-0005")
            client.get(gateway.url(node, f"/studies/{study}/instances"), params={"limit": "2"})
        client.get(gateway.url("demo", "/studies"), params={"StudyDate": "DOE^JOHN"})  # 400 echoes nothing to the log
        client.get(gateway.url("down", "/studies"), params={"PatientID": "DEMO-0007"})
        chaos.reject = "permanent"
        client.get(gateway.url("chaos", "/studies"), params={"PatientName": "SMITH^JANE"})
    log = gateway.log_text()
    assert "gateway.access" in log and '"GET /nodes/demo/dicom-web/studies/{uid}/instances" 200' in log
    forbidden = {"1.2.826.0.1.3680043.10.1137", "Müller", "MULLER", "DOE^JOHN", "SMITH", "DEMO-000", "19580412",
                 "PatientName=", "PatientID=", "?", "Yamada", "山田", "Gómez"}
    for d in studies:
        forbidden |= {str(d.PatientName), d.PatientID, d.get("PatientBirthDate", "") or "--", d.StudyInstanceUID}
    leaks = sorted(word for word in forbidden if word and word in log)
    assert not leaks, f"patient data in the application log: {leaks}"
