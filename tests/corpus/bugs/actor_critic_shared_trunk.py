"""Actor-critic with a shared trunk: the actor's optimizer steps before the critic's backward."""

import torch
from torch import nn


class ActorCritic(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(8, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh())
        self.actor = nn.Linear(64, 4)
        self.critic = nn.Linear(64, 1)

    def forward(self, obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        feats = self.trunk(obs)  # saved-by: node=AddmmBackward0 module=trunk.2
        return self.actor(feats), self.critic(feats)


torch.manual_seed(8)
model = ActorCritic()
actor_opt = torch.optim.SGD(
    [*model.trunk.parameters(), *model.actor.parameters()], lr=1e-2, momentum=0.9
)
critic_opt = torch.optim.SGD(model.critic.parameters(), lr=1e-2)
for step in range(3):
    obs, returns = torch.randn(16, 8), torch.randn(16, 1)
    actions = torch.randint(0, 4, (16,))
    logits, value = model(obs)
    advantage = (returns - value).detach()
    log_prob = torch.log_softmax(logits, dim=-1).gather(1, actions[:, None])
    actor_loss = -(log_prob * advantage).mean()
    critic_loss = nn.functional.mse_loss(value, returns)
    actor_opt.zero_grad()
    actor_loss.backward(retain_graph=True)
    actor_opt.step()  # expect: kind=inplace-write op=add_ module=SGD.step
    critic_opt.zero_grad()
    critic_loss.backward()
    critic_opt.step()
    print(f"step {step} actor {actor_loss.item():.4f} critic {critic_loss.item():.4f}")
