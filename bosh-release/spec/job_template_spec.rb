# The template renderer itself: the parts of BOSH's evaluation context the jobs rely on.
require_relative 'spec_helper'

RSpec.describe JobTemplate do
  let(:dir) { tmp }
  let(:job) { JobTemplate::Job.new(dir) }

  def write_job(template, spec_extra = {})
    spec = {
      'name' => 'demo', 'templates' => { 't.erb' => 'out' },
      'consumes' => [{ 'name' => 'db', 'type' => 'db', 'optional' => true }],
      'properties' => { 'a.b' => { 'default' => 1 }, 'a.c' => {}, 'h' => { 'default' => {} } }
    }.merge(spec_extra)
    File.write(File.join(dir, 'spec'), YAML.dump(spec))
    FileUtils.mkdir_p(File.join(dir, 'templates'))
    File.write(File.join(dir, 'templates', 't.erb'), template)
  end

  it 'gives manifest values over spec defaults and fails clearly on a missing property' do
    write_job("<%= p('a.b') %> <%= p('a.c', 'dflt') %> <%= p(%w[a.c a.b]) %>")
    expect(job.render('out')).to eq('1 dflt 1')
    expect(job.render('out', properties: { 'a' => { 'b' => 2, 'c' => 3 } })).to eq('2 3 3')
    write_job("<%= p('a.c') %>")
    expect { job.render('out') }.to raise_error(JobTemplate::Error, "Can't find property 'a.c'")
  end

  it 'lets hash properties carry keys the spec does not list' do
    write_job("<%= p('h')['x'] %>")
    expect(job.render('out', properties: { 'h' => { 'x' => 'y' } })).to eq('y')
  end

  it 'runs if_p or its else' do
    write_job("<% if_p('a.c') do |c| %>c=<%= c %><% end.else do %>none<% end %>")
    expect(job.render('out')).to eq('none')
    expect(job.render('out', properties: { 'a' => { 'c' => 5 } })).to eq('c=5')
  end

  it 'exposes spec as nested structs' do
    write_job('<%= spec.networks.default.ip %> <%= spec.job.name %> <%= spec.bootstrap %>')
    expect(job.render('out', spec: { 'bootstrap' => false })).to eq('10.0.0.10 demo false')
  end

  it 'serves declared links and refuses the rest' do
    write_job("<% if_link('db') do |db| %><%= db.p('port') %>@<%= db.instances.map(&:address).join(',') %><% end.else do %>no db<% end %>")
    expect(job.render('out')).to eq('no db')
    links = { 'db' => { 'properties' => { 'port' => 5432 }, 'instances' => [{ 'address' => 'db-0' }] } }
    expect(job.render('out', links: links)).to eq('5432@db-0')
    expect { job.render('out', links: { 'cache' => {} }) }.to raise_error(/links cache are not consumed by demo/)
    write_job("<%= link('db').p('user') %>")
    expect { job.render('out', links: links) }.to raise_error(/link 'db' has no property 'user'/)
    expect { job.render('out') }.to raise_error(/link 'db' was not provided/)
  end

  it 'trims lines with -%>' do
    write_job("<%- x = 1 -%>\nline <%= x %>\n")
    expect(job.render('out')).to eq("line 1\n")
  end

  it 'names the template it cannot find' do
    write_job('')
    expect { job.render('nope') }.to raise_error(/demo has no template rendering to nope/)
  end
end
