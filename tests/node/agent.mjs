// An agent on the official JavaScript Kubernetes client (@kubernetes/client-node
// 1.x), configured exactly as in a pod (loadFromCluster). Prints one JSON line
// per step so the test can judge what reached the agent:
//
//   node agent.mjs SECRET NAMESPACE DEPLOYMENT
//
// {"step":"get-secret","data":{...}}      the Secret's data as the agent got it
// {"step":"list-secrets","names":[...],"data":[...]}
// {"step":"delete-deployment","code":403,"message":"..."}  or {"code":200}
import * as k8s from "@kubernetes/client-node";

const [secret, namespace, deployment] = process.argv.slice(2);
const kc = new k8s.KubeConfig();
kc.loadFromCluster();
const core = kc.makeApiClient(k8s.CoreV1Api);
const apps = kc.makeApiClient(k8s.AppsV1Api);
const print = (o) => console.log(JSON.stringify(o));

const got = await core.readNamespacedSecret({ name: secret, namespace: "default" });
print({ step: "get-secret", data: got.data });
const listed = await core.listNamespacedSecret({ namespace: "default" });
print({
  step: "list-secrets",
  names: listed.items.map((s) => s.metadata.name),
  data: listed.items.map((s) => s.data ?? {}),
});
try {
  await apps.deleteNamespacedDeployment({ name: deployment, namespace });
  print({ step: "delete-deployment", code: 200 });
} catch (e) {
  let message = "";
  try {
    message = JSON.parse(e.body).message;
  } catch {
    message = String(e.body ?? e);
  }
  print({ step: "delete-deployment", code: e.code, message });
}
