// Validates Kubernetes documents of the CRD kinds taskloom uses against their
// upstream schemas (the kubernetes-models validators generated from the CRDs).
// stdin: a JSON array of documents; stdout: a JSON array of
// {apiVersion, kind, name, error}, error null when the document is valid.
// Documents of other kinds are reported with error "unknown kind".
import { readFileSync } from "node:fs";

const PACKAGES = {
  "keda.sh": "@kubernetes-models/keda",
  "monitoring.coreos.com": "@kubernetes-models/prometheus-operator",
  "cert-manager.io": "@kubernetes-models/cert-manager",
};

const documents = JSON.parse(readFileSync(0, "utf8"));
const results = [];
for (const doc of documents) {
  const [group, version] = doc.apiVersion.split("/");
  const result = { apiVersion: doc.apiVersion, kind: doc.kind, name: doc.metadata?.name, error: null };
  const pkg = PACKAGES[group];
  if (!pkg) {
    result.error = "unknown kind";
  } else {
    try {
      const module = await import(`${pkg}/${group}/${version}/${doc.kind}`);
      new module[doc.kind](doc).validate();
    } catch (e) {
      result.error = String(e?.message ?? e);
    }
  }
  results.push(result);
}
process.stdout.write(JSON.stringify(results));
